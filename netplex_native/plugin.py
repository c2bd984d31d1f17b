"""The plugin interface of the controller (as Netplex's ``plugin`` class type).

A plugin is a singleton object (``semaphore.plugin``); its per-controller
state lives in ``ctrl.plugin_data(plugin)``.  Calls from containers named
``"<prefix>.<proc>"`` reach ``ctrl_receive_call`` of the plugin whose
``prefix`` matches; the plugin answers through ``reply`` now or later (a
deferred reply is how a blocking wait is served).
"""

from __future__ import annotations


class Plugin:
    #: Short unique name (logs, admin inspect).
    name = "plugin"
    #: Call prefix routed to this plugin, or None.
    prefix: str | None = None
    #: Which public API this plugin backs ("semaphore", "mutex", "sharedvar"), if any.
    provides: str | None = None
    #: Plugins added before this one.
    required: tuple = ()

    def ctrl_added(self, ctrl) -> None:
        """Added to *ctrl* (before any container is forked)."""

    def ctrl_started(self, ctrl) -> None:
        """The controller's loop runs (before the first container is forked)."""

    def ctrl_unplugged(self, ctrl) -> None:
        """The controller shuts down; release everything."""

    def ctrl_receive_call(self, ctrl, container, proc: str, args: list, blob, reply) -> None:
        reply.error(ValueError(f"plugin {self.name} has no procedure {proc!r}"))

    def ctrl_container_stopping(self, ctrl, container) -> None:
        """The controller has just asked the container to stop (``system_shutdown``,
        ``shutdown``): wake its blocking waits so that it sees the message."""

    def ctrl_container_reaped(self, ctrl, container) -> None:
        """The container's process is gone: give back what it held.
        Runs before ``post_finish_hook``."""

    def ctrl_container_finished(self, ctrl, container_id: str, is_last: bool) -> None:
        """After ``post_finish_hook``; *is_last*: no container of its service is left."""

    def backend(self, ctrl, role: str):
        """The process-local object behind the public API in *role*
        ("controller" or "container").  Called in each process."""
        return None

    def inspect(self, ctrl) -> dict:
        """State for ``netplex-native admin inspect`` (JSON-serialisable)."""
        return {}

    def __repr__(self) -> str:
        return f"<plugin {self.name}>"
