"""pgpressure's Grafana dashboards as code (grafana-foundation-sdk): one module per dashboard,
with the shared query helpers (queries), panel builders (panels) and dashboard frame
(board). `render()` gives each dashboard's file name and JSON text."""

from __future__ import annotations

import json

from . import app_pools, database_load, overview, rds_proxy

BOARDS = (overview, app_pools, database_load, rds_proxy)


def render() -> dict[str, str]:
    """File name -> the JSON text committed in dashboards/ (stable key order)."""
    return {
        board.FILE: json.dumps(board.build(), indent=2, sort_keys=True) + "\n" for board in BOARDS
    }
