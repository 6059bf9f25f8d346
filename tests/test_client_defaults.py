"""The in-app client's defaults as a service gets them: the app's name from its own command
line (never the bare server binary), and `application_name` set to it on every connection."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from pgpressure_sqlalchemy import instrument
from pgpressure_sqlalchemy.core import _default_app
from tests.test_instrument import app_name, receiver, url  # noqa: F401 -- fixture


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["/venv/bin/gunicorn", "-w", "4", "orders.wsgi:application"], "orders"),
        (["/venv/bin/gunicorn", "--name", "orders-api", "app:app"], "orders-api"),
        (["/venv/bin/gunicorn", "-n", "billing", "-b", ":8000", "x.wsgi:app"], "billing"),
        (["/venv/bin/uvicorn", "shop.main:app", "--workers", "2"], "shop"),
        (["/venv/bin/celery", "-A", "tasks.celery_app", "worker"], "tasks"),
        (["/venv/bin/celery", "--app=reports", "worker"], "reports"),
        (["/srv/orders/__main__.py"], "orders"),
        (["/srv/bin/sync_inventory.py"], "sync_inventory"),
        (["/venv/bin/gunicorn"], "gunicorn"),  # nothing better on its command line
        ([""], "python"),
    ],
)
def test_the_default_app_name_is_the_service_not_the_server(argv, expected):
    assert _default_app(argv) == expected


def _application_name(engine: sa.Engine) -> str:
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT current_setting('application_name')")).scalar()


def test_connections_carry_the_app_name_by_default(pg, receiver):  # noqa: F811
    app = app_name()
    engine = sa.create_engine(url(pg))
    instrument(engine, app=app, endpoint=receiver.url, interval=60)
    assert _application_name(engine) == app


def test_an_application_name_the_app_sets_is_kept(pg, receiver):  # noqa: F811
    in_url = sa.create_engine(url(pg) + "?application_name=from-url")
    instrument(in_url, app=app_name(), endpoint=receiver.url, interval=60)
    assert _application_name(in_url) == "from-url"
    in_args = sa.create_engine(url(pg), connect_args={"application_name": "from-args"})
    instrument(in_args, app=app_name(), endpoint=receiver.url, interval=60)
    assert _application_name(in_args) == "from-args"


def test_opting_out_leaves_application_name_alone(pg, receiver):  # noqa: F811
    engine = sa.create_engine(url(pg))
    instrument(engine, app=app_name(), endpoint=receiver.url, interval=60, application_name=False)
    assert _application_name(engine) == ""
    by_url = sa.create_engine(
        url(pg) + f"?plugin=pgpressure&pgpressure_endpoint={receiver.url}"
        "&pgpressure_interval=60&pgpressure_application_name=0"
    )
    assert _application_name(by_url) == ""
