"""A live holder's mutex must not be handed over when thread ids are reused
within one clock tick (csrc/liveness.c L1: a thread is followed through an
open descriptor of its /proc directory, not by tid and start time).

Not part of the test suite: it needs root and Linux >= 6.14, where pid_max
is per pid namespace (on an older kernel the setting below would change the
whole machine's pid_max, so the script refuses).  Run it through
``python tests/stress.py --tid-reuse SECONDS``, or directly as root:

    python tests/tid_reuse_check.py [SECONDS]

It re-executes itself in a fresh pid namespace (``unshare -p -f
--mount-proc``) whose pid_max is 302, so ids cycle through 300 and 301.  The
holder registers while no pid is free (its death-watch thread cannot start:
the waiters then look at it every slice), locks "m", and its main thread
exits alone (a zombie leader, exiting) while C threads relay: each adds one
to a counter in a shared mapping, starts the next and exits.  40 waiter
threads try to lock "m" for SECONDS.  A waiter that gets "m" while the
counter still grows is a violation (exit status 1).  Found by an attack on
the first version of L1: the mutex was handed over within 0.6-2.4 s."""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

PID_MAX = 302
RELAY_C = r"""
#include <pthread.h>
static pthread_attr_t at;
static volatile long *counter;
static void *relay(void *a)             /* count, start the next one, exit */
{
    pthread_t t;
    __atomic_add_fetch(counter, 1, __ATOMIC_SEQ_CST);
    while (pthread_create(&t, &at, relay, a) != 0)
        ;
    return 0;
}
int relay_start(long *c)
{
    pthread_t t;
    counter = c;
    pthread_attr_init(&at);
    pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&at, 64 * 1024);
    return pthread_create(&t, &at, relay, 0);
}
"""


def refuse_unless_safe() -> None:
    if os.geteuid() != 0:
        sys.exit("tid_reuse_check: needs root (a pid namespace of its own)")
    major, minor = (int(x) for x in platform.release().split(".")[:2])
    if (major, minor) < (6, 14):
        sys.exit(f"tid_reuse_check: needs Linux >= 6.14 (pid_max per namespace); this is "
                 f"{platform.release()}: setting pid_max here would change the whole machine's")


def build_relay(tmp: str) -> str:
    src, lib = os.path.join(tmp, "relay.c"), os.path.join(tmp, "relay.so")
    with open(src, "w") as f:
        f.write(RELAY_C)
    cc = os.environ.get("CC", "cc")
    subprocess.run([cc, "-O2", "-shared", "-fPIC", "-pthread", src, "-o", lib], check=True)
    return lib


def stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def inside(seconds: float, relay: str) -> int:
    """In the namespace (pid 1 is us): the check itself."""
    import netplex_native as nn
    d = nn.Domain.create(semaphores=4, mutexes=4, processes=16)
    m = d.mutex("m")
    m.lock()
    m.unlock()
    shm = mmap.mmap(-1, 4096)
    ctr = ctypes.c_long.from_buffer(shm)
    go_r, go_w = os.pipe()
    rd_r, rd_w = os.pipe()
    got: list[tuple] = []
    stop, begin = threading.Event(), threading.Event()
    holder = [0]

    def waiter() -> None:
        begin.wait()
        while not stop.is_set():
            if m.lock(timeout=1.0):
                c1 = ctr.value
                time.sleep(0.05)
                got.append((c1, ctr.value, m.token))
                stop.set()
                m.unlock()
                return
    ths = [threading.Thread(target=waiter) for _ in range(40)]
    for t in ths:
        t.start()                               # low pids, before the fork
    pid = os.fork()
    if pid == 0:
        os.read(go_r, 1)
        blk_r, blk_w = os.pipe()
        blockers = [threading.Thread(target=os.read, args=(blk_r, 1)) for _ in range(PID_MAX - 300)]
        for t in blockers:
            t.start()                           # take every free pid
        m.lock()                                # registers: no pid for a watcher
        os.write(blk_w, b"x" * len(blockers))
        for t in blockers:
            t.join()
        assert ctypes.CDLL(relay).relay_start(ctypes.c_void_p(ctypes.addressof(ctr))) == 0
        os.write(rd_w, b"r")
        ctypes.CDLL(None).syscall(60, 0)        # SYS_exit: the main thread alone exits
        os._exit(99)
    holder[0] = pid
    with open("/proc/sys/kernel/ns_last_pid", "w") as f:
        f.write("299")
    with open("/proc/sys/kernel/pid_max", "w") as f:
        f.write(str(PID_MAX))
    os.write(go_w, b"g")
    assert os.read(rd_r, 1) == b"r"
    while stat(pid)[0] != "Z":
        time.sleep(0.001)
    begin.set()
    t0 = time.monotonic()
    while not stop.is_set() and time.monotonic() - t0 < seconds:
        time.sleep(0.2)
    stop.set()
    for t in ths:
        t.join()
    print(f"tid reuse: {seconds:.0f} s, 40 waiters, the holder's relay counted {ctr.value} "
          f"(pid_max {PID_MAX} in the namespace)")
    status = 0
    if got:
        c1, c2, tok = got[0]
        print(f"VIOLATION: a waiter holds m (token {tok}) while the holder runs "
              f"(counter {c1} -> {c2} in 50 ms)")
        status = 1
    else:
        print("no hand-over: the live holder kept its mutex")
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    d.unlink()
    d.close()
    return status


def main(seconds: float = 30.0) -> int:
    refuse_unless_safe()
    if os.environ.get("NETPLEX_TID_REUSE_INSIDE") == "1":
        return inside(seconds, os.environ["NETPLEX_TID_REUSE_RELAY"])
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, NETPLEX_TID_REUSE_INSIDE="1", NETPLEX_TID_REUSE_RELAY=build_relay(tmp))
        return subprocess.run(["unshare", "-p", "-f", "--mount-proc", sys.executable,
                               os.path.abspath(__file__), str(seconds)], env=env,
                              timeout=seconds + 120).returncode


if __name__ == "__main__":
    sys.exit(main(float(sys.argv[1]) if len(sys.argv) > 1 else 30.0))
