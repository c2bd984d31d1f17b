"""Waiting for an etcd event with a deadline, across etcd restarts.

``watch_until`` returns when an event matching *pred* arrives on the key
(range) from *start_revision* on, when the deadline passes, or when the
watch breaks (etcd restarted, compacted): in every case the caller re-reads
and decides again, so no event is ever relied on alone.  A watch is created
*from* the revision of the read the caller decided on, so nothing that
happened after that read is missed.
"""

from __future__ import annotations

import asyncio
import time

from .transport import WatchBroken, wait_for
from ..errors import EtcdUnavailableError


def remaining(deadline):
    if deadline is None:
        return None
    return max(0.0, deadline - time.monotonic())


async def watch_until(s, key, range_end, start_revision, deadline, pred) -> None:
    try:
        w = await s.t.watch(key, range_end, start_revision, deadline)
    except EtcdUnavailableError:
        if deadline is not None and remaining(deadline) == 0:
            return
        await asyncio.sleep(0.05)
        return
    try:
        while True:
            left = remaining(deadline)
            if left == 0:
                return
            try:
                events = await wait_for(w.next(), left)
            except asyncio.TimeoutError:
                return
            except WatchBroken:
                await asyncio.sleep(0.02)
                return
            if any(pred(ev) for ev in events):
                return
    finally:
        w.close()
