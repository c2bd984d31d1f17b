"""Where everything lives in etcd, under the backend's prefix P.

    P m/NAME/LEASE-RAND     a mutex waiter (bound to its process's lease);
                            the owner is the key of lowest create revision,
                            and that revision is its token
    P s/NAME/v              a semaphore: "p" or "u" (protected), its base
                            value, and the id of the last write to it
    P s/NAME/d/LEASE        a protected holder's delta (increments minus
                            decrements), bound to the holder's lease
    P s/NAME/w/LEASE-RAND   a semaphore waiter (bound to the lease)
    P n/NAME                "m": NAME is a mutex (semaphores and mutexes
                            share one namespace; the ``v`` key marks a
                            semaphore), until the mutex is destroyed
    P v/NAME                a shared variable (JSON: flags and value)
    P r/KEY                 a resource written by ``guarded_put``

NAME is escaped ("%" -> "%25", "/" -> "%2F") so that no name's range
contains another's.  Invariant: every key a process creates on behalf of a
container is bound to that container's lease, except a semaphore's ``v``
key, an unowned variable and a resource, which live until destroyed.
"""

from __future__ import annotations

import os


def esc(name: str) -> str:
    return name.replace("%", "%25").replace("/", "%2F")


def prefix_end(p: bytes) -> bytes:
    """The range_end that covers every key starting with *p*."""
    b = bytearray(p)
    while b:
        if b[-1] < 0xFF:
            b[-1] += 1
            return bytes(b)
        b.pop()
    return b"\x00"


def rand() -> str:
    return os.urandom(6).hex()


class Keys:
    def __init__(self, prefix: str):
        self.prefix = prefix

    def _b(self, s: str) -> bytes:
        return (self.prefix + s).encode()

    def mutex(self, name: str) -> bytes:
        return self._b(f"m/{esc(name)}/")

    def mutex_waiter(self, name: str, lease: int) -> bytes:
        return self.mutex(name) + f"{lease:016x}-{rand()}".encode()

    def mutex_mark(self, name: str) -> bytes:
        return self._b(f"n/{esc(name)}")

    def sem(self, name: str) -> bytes:
        return self._b(f"s/{esc(name)}/")

    def sem_value(self, name: str) -> bytes:
        return self.sem(name) + b"v"

    def sem_deltas(self, name: str) -> bytes:
        return self.sem(name) + b"d/"

    def sem_delta(self, name: str, lease: int) -> bytes:
        return self.sem_deltas(name) + f"{lease:016x}".encode()

    def sem_waiters(self, name: str) -> bytes:
        return self.sem(name) + b"w/"

    def sem_waiter(self, name: str, lease: int) -> bytes:
        return self.sem_waiters(name) + f"{lease:016x}-{rand()}".encode()

    def var(self, name: str) -> bytes:
        return self._b(f"v/{esc(name)}")

    def vars(self) -> bytes:
        return self._b("v/")

    def resource(self, key: str) -> bytes:
        return self._b(f"r/{key}")

    def all(self) -> bytes:
        return self.prefix.encode()
