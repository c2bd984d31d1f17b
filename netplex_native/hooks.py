"""ProcessorHooks: the points of a service's and a container's life.

Every method is optional; the defaults do nothing.  Which process runs which
hook (as in Netplex):

=========================  ==========  =====================================
hook                       process     when
=========================  ==========  =====================================
post_add_hook              controller  the service was added (add plugins here);
                                       also the new version of a reloaded one
post_rm_hook               controller  the service was removed (reload, shutdown)
pre_start_hook             controller  just before a container is forked;
                                       raising is a failed start
post_start_hook            container   the container is up, before it serves;
                                       raising is a failed start (exit code 3)
pre_finish_hook            container   regular end of the container only
post_finish_hook           controller  after any end (crash included), after
                                       the container's holdings were reverted
receive_message            container   a broadcast message arrived
receive_admin_message      container   an admin message arrived
system_shutdown            container   the whole system is about to stop
shutdown                   container   this container is asked to stop
global_exception_handler   both        an exception escaped a hook, timer or
                                       handler; return False to end the container
=========================  ==========  =====================================
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .logs import get_logger

if TYPE_CHECKING:
    from .container import Container
    from .controller import Controller
    from .service import Service

log = get_logger("netplex_native.hooks")


class ProcessorHooks:
    def post_add_hook(self, service: Service, ctrl: Controller) -> None:
        pass

    def post_rm_hook(self, service: Service, ctrl: Controller) -> None:
        pass

    def pre_start_hook(self, service: Service, ctrl: Controller, container_id: str) -> None:
        pass

    def post_start_hook(self, cont: Container) -> None:
        pass

    def pre_finish_hook(self, cont: Container) -> None:
        pass

    def post_finish_hook(self, service: Service, ctrl: Controller, container_id: str) -> None:
        pass

    def receive_message(self, cont: Container, name: str, args: list[str]) -> None:
        pass

    def receive_admin_message(self, cont: Container, name: str, args: list[str]) -> None:
        pass

    def system_shutdown(self) -> None:
        pass

    def shutdown(self) -> None:
        pass

    def global_exception_handler(self, exc: BaseException) -> bool:
        """Called with an exception that escaped a hook, timer or handler.
        The default logs it and keeps the container running (True)."""
        log.error("unhandled exception: %s", exc, exc_info=exc)
        return True
