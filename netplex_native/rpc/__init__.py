"""The RPC backend: state in the controller, each operation a request over the
container's channel (the reference's model; no compiled code).

- ``sync``: semaphores and mutexes (controller-side tables, FIFO deferred
  replies, revert of a dead container's holdings; container-side callers);
- ``sharedvar``: shared variables (controller-side store of bytes, never
  unpickled there; container-side callers).
"""
