"""Record every ConnectorError message made while the tests run, in this process and in
every `connector` process the tests start.

`install(directory)` wraps `ConnectorError.__init__` so that each message is
appended, as one JSON string per line, to `directory/<pid>.jsonl`. The test
session (tests/conftest.py) calls it for itself and, through
`tests/messages/site/sitecustomize.py` on `PYTHONPATH`, has every Python child
process that inherits `CONNECTOR_MESSAGES_SEEN` call it too. Nothing in the
connector knows about it.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

ENV = "CONNECTOR_MESSAGES_SEEN"
_lock = threading.Lock()


def install(directory: str | Path) -> None:
    from connector import errors

    original = errors.ConnectorError.__init__
    if getattr(original, "_records_messages", False):
        return
    folder = Path(directory)

    def __init__(self: BaseException, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        if args and isinstance(args[0], str) and args[0]:
            _write(folder, args[0])

    __init__._records_messages = True  # type: ignore[attr-defined]
    errors.ConnectorError.__init__ = __init__  # type: ignore[method-assign]


def _write(folder: Path, message: str) -> None:
    line = json.dumps(message) + "\n"
    with _lock:
        try:
            fd = os.open(folder / f"{os.getpid()}.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        except OSError:
            return  # the folder went away (a session that ended): nothing to record
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
