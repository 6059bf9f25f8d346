"""The pinning report's two joins, for the web layer to show.

- `name_log_pins`: the proxy's logs say *that* a Digest pinned, pg_stat_statements says *who*
  runs that statement and how often. Joined by statement shape (`shapes.statement_keys`, equal
  for the proxy's lowercased, `$n`-normalized Digest and pg_stat_statements' text), a log-side
  pin names its pinning-risk rows: target, role, database, queryid.
- `fingerprint_summary`: the known driver fingerprints seen across the pinning-risk rows (and
  the log-side pins and the apps' oversized statements), once each, with who runs them - the
  "which driver, and the fix" table.
- `app_warnings`: what the in-app clients saw that the database cannot (statements over the
  proxy's size limit, libpq options the proxy refuses), each with its fix.

Both take plain JSON-able data - `PinningRisk.top_offenders()` per target, and
`LogTotals.statements()` per proxy - and return JSON-able data, so a handler passes them
through without knowing how they were made.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from exporter.pinning import fingerprints, shapes

Rows = Mapping[str, list[dict]]  # target -> PinningRisk.top_offenders()


def _row_index(offenders: Rows) -> dict[str, list[dict[str, object]]]:
    index: dict[str, list[dict[str, object]]] = {}
    for target, rows in offenders.items():
        for row in rows:
            named = {
                "target": target,
                "role": row.get("role"),
                "datname": row.get("datname"),
                "queryid": row.get("queryid"),
                "calls": row.get("calls"),
            }
            for key in shapes.statement_keys(str(row.get("query", ""))):
                index.setdefault(key, []).append(named)
    return index


def name_log_pins(log_statements: Iterable[dict], offenders: Rows) -> list[dict[str, object]]:
    """Each statement a proxy's pins named (`LogTotals.statements()`), with the pinning-risk
    rows of the same statement under "statements" (empty when none is known)."""
    index = _row_index(offenders)
    out = []
    for item in log_statements:
        keys = item.get("statement_keys") or shapes.statement_keys(str(item.get("digest", "")))
        rows = [row for key in dict.fromkeys(keys) for row in index.get(key, [])]
        out.append({**item, "statements": rows})
    return out


def app_warnings(warnings: Iterable[dict]) -> list[dict[str, object]]:
    """`IngestAggregator.proxy_warnings()`, each with the fingerprints that say what its
    findings do behind RDS Proxy and how to change them."""
    out = []
    for item in warnings:
        found = []
        if item.get("oversized") or item.get("oversized_examples"):
            found.append(fingerprints.OVERSIZED_STATEMENT.as_json())
        if item.get("connect_options"):
            found.append(fingerprints.LIBPQ_OPTIONS.as_json())
        out.append({**item, "warnings": found})
    return out


def fingerprint_summary(
    offenders: Rows,
    log_pins: Mapping[str, float] | None = None,
    apps: Iterable[dict] = (),
) -> list[dict[str, object]]:
    """The fingerprints seen, in table order, each with its origin and fix, the roles that run
    it, its calls in the pinning-risk report (for oversized statements, those the apps
    counted: `apps` is `app_warnings()`) and its pins in the proxies' logs (`log_pins`:
    `LogTotals.pins_by_fingerprint()`, summed over the proxies shown)."""
    seen: dict[str, dict] = {}

    def entry(fp_id: str) -> dict:
        fp = fingerprints.BY_ID[fp_id]
        return seen.setdefault(fp_id, {**fp.as_json(), "roles": set(), "calls": 0.0, "pins": 0.0})

    for rows in offenders.values():
        for row in rows:
            for fp in row.get("fingerprints", ()):
                found = entry(str(fp["id"]))
                found["roles"].add(str(row.get("role")))
                found["calls"] += float(row.get("calls") or 0.0)
    for fp_id, pins in (log_pins or {}).items():
        entry(fp_id)["pins"] += pins
    for item in apps:
        if item.get("oversized"):
            entry(fingerprints.OVERSIZED_STATEMENT.id)["calls"] += float(item["oversized"])
    order = [fp.id for fp in fingerprints.FINGERPRINTS]
    return [
        {**seen[fp_id], "roles": sorted(seen[fp_id]["roles"])} for fp_id in order if fp_id in seen
    ]
