"""The article's example on several machines: exactly one container, across
every machine running this script, runs the periodic job; when its owner
dies (its container killed: at once; its whole machine: after the lease
TTL) a container elsewhere takes over.

    etcd ...                                                 # one etcd (or a cluster)
    python3 examples/etcd_job_owner.py 10.0.0.5:2379         # on machine 1
    python3 examples/etcd_job_owner.py 10.0.0.5:2379         # on machine 2

Environment: JOB_INTERVAL (seconds, default 5), ETCD_PREFIX (default
"example/"), LEASE_TTL (default 5).
"""

import os
import sys

import netplex_native as netplex
from netplex_native import cenv, etcd, semaphore

SEM = "jobs.timer_owner"           # value 1 = the job is free
backend = etcd.Backend(sys.argv[1].split(","), prefix=os.environ.get("ETCD_PREFIX", "example/"),
                       lease_ttl=float(os.environ.get("LEASE_TTL", "5")))
INTERVAL = float(os.environ.get("JOB_INTERVAL", "5"))


class Hooks(netplex.ProcessorHooks):
    own = False

    def post_add_hook(self, service: netplex.Service, ctrl: netplex.Controller) -> None:
        ctrl.add_plugin(backend.semaphore_plugin)      # instead of semaphore.native_plugin

    def post_start_hook(self, cont: netplex.Container) -> None:
        semaphore.create(SEM, 1, protected=True)       # False if it existed: fine
        if not self.try_start():                       # retry until we own it
            cenv.create_timer(lambda t: not self.try_start(), 0.1)

    def try_start(self) -> bool:
        # -1: someone (on some machine) owns the job; 0: we took it.  The unit
        # is protected: it comes back when this container's lease goes.
        if not self.own and semaphore.decrement(SEM) == 0:
            self.own = True
            print(f"owner {cenv.self_cont().id} pid {os.getpid()}", flush=True)
            cenv.create_timer(self.job, INTERVAL)
        return self.own

    def job(self, timer: netplex.Timer) -> bool:
        print(f"job {cenv.self_cont().id} pid {os.getpid()}", flush=True)
        return True                                    # re-arm


if __name__ == "__main__":
    ctrl = netplex.Controller()
    ctrl.add_service(netplex.Service("jobs", hooks=Hooks(), workers=2))
    ctrl.run()
