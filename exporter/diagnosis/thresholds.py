"""The rules' thresholds, with defaults, overridable in config.yaml under `diagnosis:`.

```yaml
diagnosis:               # exporter.config.DiagnosisConfig: enabled, interval, window, max_series
  thresholds:
    pool_undersized: {at_max_share: 0.5}
    database_cpu_saturated: {aas_over_vcpus: 1.0}
    temp_spills: {enabled: false}
```

Each rule reads only its own block plus, where a rule depends on another's verdict (a pool is
not undersized while its database is saturated), that rule's block, so one definition of
"saturated" holds everywhere. docs/diagnosis.md says why each default is what it is.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

Share = Annotated[float, Field(ge=0.0, le=1.0)]
Positive = Annotated[float, Field(gt=0.0)]
NonNegative = Annotated[float, Field(ge=0.0)]


class _Block(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    enabled: bool = True


class PoolUndersized(_Block):
    at_max_share: Share = 0.5  # every connection checked out for half the window or more
    pending_share: Share = 0.25  # callers waiting for a quarter of the window or more
    # mean wait for a connection at least the mean statement time (means: both p95s can fall
    # in the same histogram bucket), and at least 10 ms: shorter waits cost little
    wait_over_statement: Positive = 1.0
    min_wait_seconds: NonNegative = 0.01
    headroom: Annotated[float, Field(ge=1.0)] = 1.25  # suggested size over what is in use


class ConnectionsHeldIdle(_Block):
    busy_share: Share = 0.33  # statements fill under a third of the time a connection is held
    min_hold_seconds: NonNegative = 0.05  # mean hold of 50 ms or more: below, it is noise
    min_checkouts_per_second: NonNegative = 0.05
    idle_in_transaction_seconds: Positive = 30.0  # or a session of the app idle in a transaction


class DatabaseCpuSaturated(_Block):
    aas_over_vcpus: Positive = 1.0  # average active sessions above the vCPUs
    cpu_share: Share = 0.5  # and CPU is the main wait
    critical_over_vcpus: Positive = 2.0  # twice the vCPUs: critical


class LockContention(_Block):
    lock_share: Share = 0.3  # Lock waits are 30% of the load or more
    min_lock_aas: NonNegative = 0.5  # and at least half a session waits on average
    held_seconds: Positive = 30.0  # or a blocker has held its lock this long
    critical_held_seconds: Positive = 300.0


class TempSpills(_Block):
    bytes_per_second: Positive = 1_048_576.0  # 1 MiB/s written to temporary files
    top_statements: Annotated[int, Field(ge=1, le=20)] = 3


class ConnectionChurn(_Block):
    replaced_per_second: Positive = 0.2  # a connection replaced every 5 s or more often
    replaced_per_checkout: Share = 0.01  # and for one checkout in 100 or more


class PoolsExceedServer(_Block):
    share: Positive = 1.0  # the pools' maxima above this share of the usable connections


class ProxyPinning(_Block):
    pinned_share: Share = 0.3  # 30% of the proxy's database connections pinned on average
    top_reasons: Annotated[int, Field(ge=1, le=20)] = 3


class IdleInTransaction(_Block):
    seconds: Positive = 60.0  # a session idle inside a transaction for a minute or more
    critical_seconds: Positive = 600.0


class Thresholds(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    pool_undersized: PoolUndersized = PoolUndersized()
    connections_held_idle: ConnectionsHeldIdle = ConnectionsHeldIdle()
    database_cpu_saturated: DatabaseCpuSaturated = DatabaseCpuSaturated()
    lock_contention: LockContention = LockContention()
    temp_spills: TempSpills = TempSpills()
    connection_churn: ConnectionChurn = ConnectionChurn()
    pools_exceed_server: PoolsExceedServer = PoolsExceedServer()
    proxy_pinning: ProxyPinning = ProxyPinning()
    idle_in_transaction: IdleInTransaction = IdleInTransaction()

    def enabled(self, rule: str) -> bool:
        return bool(getattr(self, rule).enabled)
