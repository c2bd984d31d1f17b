"""The etcd client thread of one process: its own asyncio loop, on which
every etcd request of that process runs.

Why a thread: a container is an asyncio loop, and a synchronous call
(``Mutex.lock()`` in a hook) cannot run the loop it blocks.  Synchronous
calls hand their coroutine to this thread and wait for the answer; awaitable
calls (``lock_async``...) await it from the container's loop without
blocking it.  Thousands of waits are thousands of coroutines here, not
threads.

Invariants:
- One runner per process, made in that process (``runner()`` checks the
  pid): a forked child never uses its parent's thread or channels.
- A cancelled awaitable call cancels the coroutine's task here, and the
  task's own outcome decides: cancelled (the recipe cleaned up after
  itself), or completed — what it obtained anyway (the grant crossed the
  cancel) is given back by *give_back*.  The concurrent future is never
  cancelled from outside, so a completed grant is never dropped unseen.
- A synchronous call made from the runner thread itself is a bug and raises.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading


class Runner:
    def __init__(self, name: str):
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._main, name=name, daemon=True)
        self.thread.start()
        self._ready.wait()

    def _main(self):
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        try:
            self.loop.run_forever()
        finally:
            try:
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            except Exception:
                pass

    def submit(self, coro) -> concurrent.futures.Future:
        """Run *coro* as a task here; the future mirrors the task's outcome."""
        cf = concurrent.futures.Future()
        cf.task = None

        def start():
            if not cf.set_running_or_notify_cancel():
                coro.close()
                return
            t = cf.task = self.loop.create_task(coro)

            def done(t):
                if t.cancelled():
                    cf.set_exception(asyncio.CancelledError())
                elif t.exception() is not None:
                    cf.set_exception(t.exception())
                else:
                    cf.set_result(t.result())
            t.add_done_callback(done)
        self.loop.call_soon_threadsafe(start)
        return cf

    def run(self, coro, give_back=None):
        """Run *coro* here and wait for it (a synchronous call)."""
        if threading.current_thread() is self.thread:
            coro.close()
            raise RuntimeError("synchronous etcd call from the etcd client thread")
        cf = self.submit(coro)
        try:
            return cf.result()
        except BaseException:   # KeyboardInterrupt while waiting
            if not cf.done():
                self._abandon(cf, give_back)
            raise

    async def arun(self, coro, give_back=None):
        """Await *coro* run here, from another loop (a handler's)."""
        cf = self.submit(coro)
        fut = asyncio.wrap_future(cf)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())   # retrieved
            self._abandon(cf, give_back)
            raise

    def _abandon(self, cf, give_back):
        def cancel():                  # runs after start() (call_soon is FIFO)
            t = cf.task
            if t is not None and not t.done():
                t.cancel()             # again every 50 ms until it ends: a library
                self.loop.call_later(0.05, cancel)   # may swallow one cancellation
        self.loop.call_soon_threadsafe(cancel)
        if give_back is None:
            return

        def undo(f):
            if not f.cancelled() and f.exception() is None:
                give = give_back(f.result())
                if give is not None:
                    self.submit(give)
        cf.add_done_callback(undo)

    def stop(self, timeout: float = 2.0):
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout)
