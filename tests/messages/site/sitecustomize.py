"""Started by every Python process of a test session (PYTHONPATH): in the
`connector` processes only, record the connector's error messages when the
session asks for it (tests/messages/record.py, loaded by its path so that no
package is imported into other processes)."""

import importlib.util
import os
import sys


def _is_connector(argv: list[str]) -> bool:
    if len(argv) > 2 and argv[1] == "-m" and argv[2] == "connector":
        return True
    return bool(argv) and os.path.basename(argv[0]) == "connector"


if os.environ.get("CONNECTOR_MESSAGES_SEEN") and _is_connector(list(sys.orig_argv)):
    _path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "record.py")
    _spec = importlib.util.spec_from_file_location("_connector_messages_record", _path)
    if _spec is not None and _spec.loader is not None:
        _module = importlib.util.module_from_spec(_spec)
        _spec.loader.exec_module(_module)
        _module.install(os.environ["CONNECTOR_MESSAGES_SEEN"])
