"""Switching one object to a generated subclass of its own class, and recognising
SQLAlchemy's own method bodies: how the pool (pool.py) and the dialect (dialect.py) are
instrumented without an engine-level listener.

The request-path functions the subclasses get take what they use as default arguments
(`_now=...`): CPython hands those to the frame as plain locals, where closure variables are
one object each to reach through (and module globals a dictionary check), and cold caches
make every object touched per checkout count. They are never passed by SQLAlchemy. Where
SQLAlchemy's method is exactly the body we know (`same_code`), the override does that work
itself, with the objects that method's module refers to, instead of calling it; anything else
(a subclass's override, another version's body) is called as it is.
"""

from __future__ import annotations

import dis
import sys
from typing import Any

# SQLAlchemy's bodies (2.0 and 2.1) that the request path inlines when they are exactly these.
KNOWN = {
    "connect": "def connect(self):\n    return _ConnectionFairy._checkout(self)\n",
    "queue_return": (
        "def _do_return_conn(self, record):\n"
        "    try:\n"
        "        self._pool.put(record, False)\n"
        "    except sqla_queue.Full:\n"
        "        try:\n"
        "            record.close()\n"
        "        finally:\n"
        "            self._dec_overflow()\n"
    ),
    "do_execute": (
        "def do_execute(self, cursor, statement, parameters, context=None):\n"
        "    cursor.execute(statement, parameters)\n"
    ),
    "do_execute_no_params": (
        "def do_execute_no_params(self, cursor, statement, context=None):\n"
        "    cursor.execute(statement)\n"
    ),
    "do_executemany": (
        "def do_executemany(self, cursor, statement, parameters, context=None):\n"
        "    cursor.executemany(statement, parameters)\n"
    ),
}


def same_code(func: Any, known: str) -> bool:
    """Whether `func` is the function `KNOWN[known]`, instruction by instruction (names and
    constants compared by value, so a docstring or annotations make no difference)."""
    namespace: dict[str, Any] = {}
    try:
        exec(KNOWN[known], namespace)  # our own constant source
        reference = next(v for k, v in namespace.items() if k != "__builtins__")
        code = getattr(func, "__code__", None)
        if (
            code is None
            or code.co_varnames[: code.co_argcount]
            != (reference.__code__.co_varnames[: reference.__code__.co_argcount])
        ):
            return False

        def steps(f: Any) -> list[tuple[str, Any]]:
            return [(i.opname, i.argval) for i in dis.get_instructions(f)]

        return steps(func) == steps(reference)
    except Exception:
        return False


def adopt(obj: Any, cls: type) -> None:
    """`obj.__class__ = cls` (a subclass of its class), giving `obj` an instance dict laid out
    for `cls`, with the same attributes in the same order.

    CPython 3.11 specialises a call like SQLAlchemy's `self.pool.connect()` or
    `self.dialect.do_execute()` on the object's class and on its instance dict having that
    class's shared key layout. After a bare `__class__` assignment the dict keeps the old
    class's layout and every method call on the object (a handful per checkout and per
    statement) misses and falls back to a lookup through the class hierarchy: valgrind
    counted 5,000 more instructions and 100 more cache misses per checkout and statement.
    A fresh, never initialised instance of `cls` lends its dict, with every key set in order,
    and takes the object's values. The swap runs with thread switching held off (a GIL
    build's switch interval), so no other thread writes the old dict meanwhile; where that
    cannot be had, or anything is unexpected, it is the bare assignment, which only costs
    speed."""
    gil = getattr(sys, "_is_gil_enabled", lambda: True)()
    try:
        state = obj.__dict__
        if not gil or type(state) is not dict:
            raise TypeError("no layout to adopt")
        shadow = object.__new__(cls)
        for key in state:
            setattr(shadow, key, None)  # the layout: cls's shared keys, in obj's order
        layout = shadow.__dict__
        interval = sys.getswitchinterval()
        sys.setswitchinterval(1000.0)  # no thread switch until restored (a few us)
        try:
            if list(layout) == list(obj.__dict__):  # no attribute added meanwhile
                layout.update(obj.__dict__)
                obj.__class__ = cls
                obj.__dict__ = layout
                return
        finally:
            sys.setswitchinterval(interval)
    except Exception:
        pass
    obj.__class__ = cls
