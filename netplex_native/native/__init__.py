"""The native backend: semaphores and mutexes in a POSIX shared-memory segment,
served by the C core (``netplex_native._core``, built from ``csrc/``).

- ``domain``: ``Domain``, the Python face of one segment (any process: the
  supervisor creates it, workers use it; the supervisor calls ``recover(pid)``);
- ``plugins``: the controller's plugins over a Domain (controller side: create,
  recover each reaped container, unlink; container side: the operations).
"""
