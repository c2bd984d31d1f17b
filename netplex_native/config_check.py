"""A reload's trial load, in a throwaway process (``python -m
netplex_native.config_check CONFIG RESULT``): it loads the file as
``config.load`` does -- importing the modules it names -- and writes the
outcome (JSON) to RESULT.  ``FileSource`` runs it before a reload imports
anything in the controller, so that a module whose import ends the process
(``os._exit``), forks, or never finishes is caught without touching the
controller.

Invariants: this process never serves anything and never outlives its
check: it ends with ``os._exit`` once the outcome is written (a module's
non-daemon thread cannot keep it), a process forked by a module's import
ends at once, and the caller kills it when it takes longer than its
timeout.  Its ``sys.path`` is the controller's (passed in the environment).
"""

from __future__ import annotations

import json
import os
import sys

#: Environment variable carrying the controller's sys.path (JSON).
PATH_ENV = "NETPLEX_NATIVE_CHECK_SYS_PATH"


def _write(result_path: str, outcome: dict) -> None:
    tmp = result_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(outcome, f)
    os.replace(tmp, result_path)


def main(config_path: str, result_path: str) -> None:
    forks = []

    def forked_in_child():
        os._exit(0)                 # a copy made by a module's import: gone at once
    os.register_at_fork(before=lambda: forks.append(1), after_in_child=forked_in_child)
    try:
        sys.path[:] = json.loads(os.environ.get(PATH_ENV, "null")) or sys.path
    except ValueError:
        pass
    from . import config
    try:
        config.load(config_path)
        if forks:
            outcome = {"ok": False, "error": f"{config_path}: a module forked a process while "
                                             "it was imported; a reload would fork the controller"}
        else:
            outcome = {"ok": True}
    except (Exception, SystemExit, KeyboardInterrupt) as e:
        outcome = {"ok": False, "error": str(e) if isinstance(e, (ValueError, TypeError))
                   else f"{type(e).__name__}: {e}"}
    _write(result_path, outcome)
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except (OSError, ValueError):
            pass
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
