"""Logging: one logger hierarchy, and records that say where they come from.

Loggers: ``netplex_native`` and below it ``.controller``, ``.container``,
``.admin``, ``.channel``, ``.hooks``, ``.rpc``, ``.cli`` (route or silence
them as any logging hierarchy).  ``get_logger(NAME)`` returns one of them
with ``ContextFilter``, so every record it makes carries ``service`` and
``container`` (the container's service name and id; ``-`` in the
controller).  The CLI puts the same filter on its handler, so that records
of the application's own loggers carry them too.

``set_title``: the process title (``netplex-native: controller NAME``,
``netplex-native: container ID of SERVICE (controller NAME)``).

``reopen_log_files``: every ``logging.FileHandler`` reopens its file (after
a rotation: SIGUSR1 to the controller, which forwards it to the containers).
"""

from __future__ import annotations

import logging

from ._context import ctx

FORMAT = "%(asctime)s %(levelname)s %(name)s [pid %(process)d] [%(service)s %(container)s] %(message)s"


class ContextFilter(logging.Filter):
    """Adds ``service`` and ``container`` to every record (never drops one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "container"):
            cont = ctx.container if ctx.role == "container" else None
            record.service = cont.service_name if cont is not None else "-"
            record.container = cont.id if cont is not None else "-"
        return True


_FILTER = ContextFilter()


def get_logger(name: str) -> logging.Logger:
    lg = logging.getLogger(name)
    if _FILTER not in lg.filters:
        lg.addFilter(_FILTER)
    return lg


def setup(level: str, log_file: str | None = None) -> None:
    """The CLI's logging: one line per record on stderr, or appended to *log_file*."""
    handler = logging.FileHandler(log_file, mode="a") if log_file else logging.StreamHandler()
    handler.addFilter(_FILTER)
    handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))


def set_title(title: str) -> None:
    """The process title shown by ps and top (setproctitle; nothing without it)."""
    try:
        from setproctitle import setproctitle
    except ImportError:
        return
    setproctitle(f"netplex-native: {title}")


def reopen_log_files() -> int:
    """Reopen the file of every ``logging.FileHandler``; how many."""
    n = 0
    seen = set()
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    for lg in loggers:
        for h in lg.handlers:
            if isinstance(h, logging.FileHandler) and id(h) not in seen:
                seen.add(id(h))
                h.acquire()
                try:
                    if h.stream is not None:
                        h.stream.close()
                    h.stream = h._open()
                    n += 1
                except OSError as e:
                    h.stream = None
                    get_logger("netplex_native").error("cannot reopen log file %s: %s", h.baseFilename, e)
                finally:
                    h.release()
    return n
