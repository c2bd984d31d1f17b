"""The controller's selector: containers' calls served inside ``select``.

Runs in the controller process, on its loop's thread only.  An asyncio loop
pays one whole iteration (``_run_once``: timer bookkeeping, a handle made
and run for each ready fd) per container call; at one call in flight per
container that iteration costs about as much as serving the call.  This
selector serves a container's channel the moment it is readable, from
inside ``select``, and polls again, as long as the loop has nothing else to
do.  Invariants:

 S1 ``select(timeout)`` returns what ``selectors.EpollSelector.select``
    returns, except that when every event of one poll is "readable, nothing
    else" on fds marked hot (``set_hot``), it runs their callbacks itself
    and polls again instead of returning.  It returns (an empty list if it
    served the last poll itself) as soon as any of these holds:
    - a poll reports anything else: another fd, or a hot fd writable,
      hung up or in error (the loop handles all of that poll's events);
    - the loop has a callback ready (``loop._ready``: a hot callback
      scheduled work), a new first timer (``loop._scheduled``: a hot
      callback scheduled one earlier than every other, a wait's timeout
      say), or is stopping;
    - the caller's timeout has passed (the loop's next timer is due);
    - HOT_BURST callbacks were run in this call.
    The checks run after each poll's callbacks (one per ready hot fd), so
    nothing the loop would have run is delayed by more than one poll's
    worth of hot callbacks, and a burst may pass HOT_BURST by as many:
    other fds, ``call_soon_threadsafe`` (the self-pipe is an fd) and
    signals (asyncio's wakeup fd) end the inner polling at once.
 S2 An fd is served inline only while the reader asyncio has registered
    for it is the very handle ``set_hot`` found there: a ``remove_reader``,
    another ``add_reader``, an fd closed and reused all replace that handle
    (the registration's data), and the fd's events then go to the loop as
    usual.  ``unregister`` forgets the mark.
 S3 A hot callback's exception is reported through the loop's exception
    handler, as asyncio reports a callback's, and select returns at once;
    only SystemExit and KeyboardInterrupt propagate, as from a handle.  A
    callback served here runs in the loop's own context (not a copy, as a
    handle's), and debug mode's slow-callback warning does not see it.
 S4 Nothing here needs a loop feature it cannot find: ``bind`` checks that
    the loop has the ``_ready`` queue, ``_scheduled`` heap and ``_stopping``
    flag it reads, and that this selector has the epoll object and fd map
    (``_selector``, ``_fd_to_key``) of the standard library's; if not, no fd
    is ever served inline (plain EpollSelector behaviour).  ``set_hot``
    marks an fd only if its registration holds asyncio's reader handle for
    the callback given (``key.data[0]._callback``); else it says no and the
    loop serves that fd as any other.
"""

from __future__ import annotations

import math
import select as _select
import selectors
import time

#: Most hot callbacks run inside one select call before the loop iterates.
HOT_BURST = 256

_EPOLLIN = _select.EPOLLIN
_EPOLLOUT = _select.EPOLLOUT
_READ = selectors.EVENT_READ
_WRITE = selectors.EVENT_WRITE


class HotSelector(selectors.EpollSelector):
    """An EpollSelector that serves hot fds' reads itself (S1-S4)."""

    def __init__(self) -> None:
        super().__init__()
        self._hot: dict[int, object] = {}
        self._loop = None

    def bind(self, loop) -> bool:
        """The loop whose idleness decides when to keep polling (S4)."""
        if (all(hasattr(loop, a) for a in ("_ready", "_scheduled", "_stopping"))
                and hasattr(getattr(self, "_selector", None), "poll") and hasattr(self, "_fd_to_key")):
            self._loop = loop
            return True
        self._loop = None
        return False

    def set_hot(self, fd: int, callback) -> bool:
        """Serve *fd*'s readability by calling *callback* from select, as
        long as the reader registered now (loop.add_reader(fd, callback),
        done just before) stays registered (S2).  False, and the fd is
        served by the loop as usual, if that reader cannot be recognised
        (S4: not asyncio's (reader, writer) handles, or not *callback*)."""
        key = self.get_map().get(fd)
        reader = key.data[0] if key is not None and type(key.data) is tuple and key.data else None
        if reader is None or not key.events & _READ or getattr(reader, "_callback", None) != callback:
            self._hot.pop(fd, None)
            return False
        self._hot[fd] = (reader, callback)
        return True

    def unregister(self, fileobj):
        key = super().unregister(fileobj)
        self._hot.pop(key.fd, None)
        return key

    def close(self) -> None:
        self._hot.clear()
        self._loop = None
        super().close()

    def select(self, timeout=None):
        loop, hot = self._loop, self._hot
        if loop is None or not hot or (timeout is not None and timeout <= 0):
            return super().select(timeout)
        if timeout is None:
            t, deadline = -1, None
        else:   # as EpollSelector: wait at least timeout (1 ms resolution)
            t = math.ceil(timeout * 1e3) * 1e-3
            deadline = time.monotonic() + t
        poll = self._selector.poll
        fd_to_key = self._fd_to_key
        max_ev = max(len(fd_to_key), 1)
        timers = loop._scheduled
        first = timers[0] if timers else None
        served = 0
        while True:
            try:
                events = poll(t, max_ev)
            except InterruptedError:
                return []
            if not events:
                return []
            for fd, ev in events:
                h = hot.get(fd)
                if ev != _EPOLLIN or h is None:
                    return self._keys(events)
                key = fd_to_key.get(fd)
                if key is None or key.data[0] is not h[0]:
                    return self._keys(events)
            for fd, _ev in events:
                h = hot.get(fd)             # (an earlier callback may have changed it:
                key = fd_to_key.get(fd)     # the loop polls again, level-triggered)
                if h is None or key is None or key.data[0] is not h[0]:
                    return []
                cb = h[1]
                served += 1
                try:
                    cb()
                except (SystemExit, KeyboardInterrupt):
                    raise
                except BaseException as exc:     # S3
                    loop.call_exception_handler({
                        "message": "Exception in a container channel's reader",
                        "exception": exc,
                    })
                    return []
            if (loop._ready or loop._stopping or served >= HOT_BURST
                    or (loop._scheduled and loop._scheduled[0] is not first)):
                return []
            if deadline is not None:
                t = deadline - time.monotonic()
                if t <= 0:
                    return []
                t = math.ceil(t * 1e3) * 1e-3

    def _keys(self, events):
        """A poll's events as EpollSelector.select returns them."""
        ready = []
        fd_to_key = self._fd_to_key
        for fd, ev in events:
            mask = 0
            if ev & ~_EPOLLIN:
                mask |= _WRITE
            if ev & ~_EPOLLOUT:
                mask |= _READ
            key = fd_to_key.get(fd)
            if key:
                ready.append((key, mask & key.events))
        return ready
