"""``netplex-native run CONFIG.toml``: services from a TOML file.

::

    [controller]                 # optional
    socket_dir = "/run/myapp"    # default: netplex-native's per-user directory
    max_start_failures = 10

    [[service]]
    name = "echo"
    handler = "echo_app:handle"  # module:callable, an async (reader, writer) function
    hooks = "echo_app:Hooks"     # optional, a ProcessorHooks subclass (made with no arguments)
    address = "tcp://127.0.0.1:8000"   # or "unix:///path", or omitted
    workers = 4
    plugins = "native"           # "native", "rpc" or "none" (default "native")

Modules are imported relative to the file's directory first.  Every error
names the file, the key and what was expected, and is raised before anything
forks.
"""

from __future__ import annotations

import importlib
import os
import sys
import tomllib

from .errors import ServiceConfigError
from .hooks import ProcessorHooks
from .service import Service, parse_address

SERVICE_KEYS = {"name", "handler", "hooks", "address", "workers", "plugins", "max_connections",
                "max_connections_jitter", "connections_per_container", "min_free_connections",
                "max_free_connections"}
CONTROLLER_KEYS = {"socket_dir", "max_start_failures", "shutdown_timeout", "startup_timeout"}
PLUGIN_CHOICES = ("native", "rpc", "none", "etcd")


class _Err:
    def __init__(self, path):
        self.path = path

    def __call__(self, where: str, msg: str) -> ServiceConfigError:
        return ServiceConfigError(f"{self.path}: {where}: {msg}")


def _resolve(ref, where, err, fresh=None):
    """*fresh*: a set of module names already reloaded by this load (a
    reload imports the application's modules anew, once each)."""
    if not isinstance(ref, str) or ref.count(":") != 1:
        raise err(where, f"expected \"module:name\", got {ref!r}")
    mod_name, _, attr = ref.partition(":")
    try:
        if (fresh is not None and mod_name not in fresh and mod_name in sys.modules
                and mod_name.partition(".")[0] != "netplex_native"):
            fresh.add(mod_name)
            mod = importlib.reload(sys.modules[mod_name])
        else:
            mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise err(where, f"cannot import module {mod_name!r}: {e}") from None
    except (Exception, SystemExit, KeyboardInterrupt) as e:   # a module's sys.exit() too
        raise err(where, f"importing module {mod_name!r} failed: {type(e).__name__}: {e}") from None
    obj = mod
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise err(where, f"module {mod_name!r} has no attribute {attr!r}") from None
    return obj


class _PluginHooks(ProcessorHooks):
    """Wraps a service's hooks to add the configured plugins first."""

    def __init__(self, inner: ProcessorHooks, plugins: str, etcd=None):
        self._inner = inner
        self._plugins = plugins
        self._etcd = etcd           # the etcd.Backend of the [etcd] table (plugins = "etcd")

    def post_add_hook(self, service, ctrl):
        from . import semaphore, mutex, sharedvar
        if self._plugins == "native":
            ctrl.add_plugin(semaphore.native_plugin)
            ctrl.add_plugin(mutex.native_plugin)
        elif self._plugins == "rpc":
            ctrl.add_plugin(semaphore.plugin)
            ctrl.add_plugin(mutex.plugin)
        elif self._plugins == "etcd":
            ctrl.add_plugin(self._etcd.semaphore_plugin)
            ctrl.add_plugin(self._etcd.mutex_plugin)
            ctrl.add_plugin(self._etcd.sharedvar_plugin)
        if self._plugins not in ("none", "etcd"):
            ctrl.add_plugin(sharedvar.plugin)
        self._inner.post_add_hook(service, ctrl)

    def __getattribute__(self, name):
        if name in ("post_add_hook", "_inner", "_plugins", "_etcd"):
            return object.__getattribute__(self, name)
        return getattr(object.__getattribute__(self, "_inner"), name)


def backend(services) -> str:
    """The plugins of services made by ``load``: native, rpc or none."""
    chosen = {getattr(s.hooks, "_plugins", "none") for s in services} - {"none"}
    return chosen.pop() if chosen else "none"


def load(path: str, reload_modules: bool = False) -> tuple[dict, list[Service]]:
    """Parse and validate *path*; returns (controller options, services).
    *reload_modules*: import the handler and hooks modules anew (SIGHUP)."""
    err = _Err(path)
    fresh = set() if reload_modules else None
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise ServiceConfigError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise ServiceConfigError(f"{path}: not valid TOML: {e}") from None
    unknown = set(doc) - {"controller", "service", "etcd"}
    if unknown:
        raise err(", ".join(sorted(unknown)), "unknown top-level key; expected [controller], [[service]] "
                                              "and [etcd]")
    etcd_backend = _etcd_backend(doc.get("etcd"), err)
    ctrl_opts = doc.get("controller", {})
    if not isinstance(ctrl_opts, dict):
        raise err("controller", "expected a table [controller]")
    for k in ctrl_opts:
        if k not in CONTROLLER_KEYS:
            raise err(f"controller.{k}", f"unknown key; expected one of {sorted(CONTROLLER_KEYS)}")
    if "socket_dir" in ctrl_opts and not isinstance(ctrl_opts["socket_dir"], str):
        raise err("controller.socket_dir", "expected a string (a directory path)")
    for k in ("max_start_failures",):
        if k in ctrl_opts and (type(ctrl_opts[k]) is not int or ctrl_opts[k] < 1):
            raise err(f"controller.{k}", "expected an integer >= 1")
    if "shutdown_timeout" in ctrl_opts and (type(ctrl_opts["shutdown_timeout"]) not in (int, float)
                                            or ctrl_opts["shutdown_timeout"] <= 0):
        raise err("controller.shutdown_timeout", "expected a number of seconds > 0")
    if "startup_timeout" in ctrl_opts and (type(ctrl_opts["startup_timeout"]) not in (int, float)
                                           or not ctrl_opts["startup_timeout"] > 0):
        raise err("controller.startup_timeout", "expected a number of seconds > 0")
    services_doc = doc.get("service")
    if not isinstance(services_doc, list) or not services_doc:
        raise err("service", "expected at least one [[service]] table")
    base = os.path.dirname(os.path.abspath(path))
    if base not in sys.path:
        sys.path.insert(0, base)
    services = []
    names = set()
    for i, sd in enumerate(services_doc):
        name = sd.get("name")
        where = f"service {name!r}" if isinstance(name, str) and name else f"service[{i}]"
        for k in sd:
            if k not in SERVICE_KEYS:
                raise err(f"{where}.{k}", f"unknown key; expected one of {sorted(SERVICE_KEYS)}")
        if not isinstance(name, str) or not name:
            raise err(f"{where}.name", "expected a non-empty string")
        if name in names:
            raise err(f"{where}.name", "duplicate service name")
        names.add(name)
        handler = None
        if "handler" in sd:
            handler = _resolve(sd["handler"], f"{where}.handler", err, fresh)
        hooks = ProcessorHooks()
        if "hooks" in sd:
            cls = _resolve(sd["hooks"], f"{where}.hooks", err, fresh)
            if not (isinstance(cls, type) and issubclass(cls, ProcessorHooks)):
                raise err(f"{where}.hooks", "expected a ProcessorHooks subclass")
            try:
                hooks = cls()
            except (Exception, SystemExit, KeyboardInterrupt) as e:
                raise err(f"{where}.hooks", f"creating {sd['hooks']} failed: {e}") from None
        address = sd.get("address")
        if address is not None:
            try:
                parse_address(address)
            except (TypeError, ValueError) as e:
                raise err(f"{where}.address", str(e)) from None
        workers = sd.get("workers", 1)
        dynamic = {}
        if isinstance(workers, dict):       # workers = { min = 1, max = 8 }: dynamic workload
            if set(workers) != {"min", "max"} or any(type(v) is not int for v in workers.values()) \
                    or not 1 <= workers["min"] <= workers["max"] <= 4096:
                raise err(f"{where}.workers", "expected { min = N, max = M } with integers "
                          f"1 <= N <= M <= 4096, got {workers!r}")
            workers, dynamic["max_workers"] = workers["min"], workers["max"]
            if address is None:
                raise err(f"{where}.workers", "a dynamic workload { min, max } needs an address")
        elif type(workers) is not int or not 1 <= workers <= 4096:
            raise err(f"{where}.workers", f"expected an integer between 1 and 4096 or {{ min = N, max = M }}, "
                      f"got {workers!r}")
        for k in ("connections_per_container", "min_free_connections", "max_free_connections"):
            if k in sd:
                if not dynamic:
                    raise err(f"{where}.{k}", "only for a dynamic workload (workers = { min = N, max = M })")
                if type(sd[k]) is not int or not 0 <= sd[k] <= 2 ** 31:
                    raise err(f"{where}.{k}", f"expected an integer between 0 and {2 ** 31}, got {sd[k]!r}")
                dynamic[k] = sd[k]
        plugins = sd.get("plugins", "native")
        if plugins not in PLUGIN_CHOICES:
            raise err(f"{where}.plugins", f"expected one of {', '.join(PLUGIN_CHOICES)}, got {plugins!r}")
        if plugins == "etcd" and etcd_backend is None:
            raise err(f"{where}.plugins", "plugins = \"etcd\" needs an [etcd] table with endpoints")
        limits = {}
        for k, low in (("max_connections", 1), ("max_connections_jitter", 0)):
            if k in sd:
                if type(sd[k]) is not int or not low <= sd[k] <= 2 ** 31:
                    raise err(f"{where}.{k}", f"expected an integer between {low} and {2 ** 31}, got {sd[k]!r}")
                limits[k] = sd[k]
        if "max_connections_jitter" in limits and "max_connections" not in limits:
            raise err(f"{where}.max_connections_jitter", "needs max_connections")
        try:
            svc = Service(name, handler, hooks=_PluginHooks(hooks, plugins, etcd_backend), address=address, workers=workers,
                          **limits, **dynamic)
        except (TypeError, ValueError) as e:
            raise err(where, str(e)) from None
        services.append(svc)
    chosen = {sd.get("plugins", "native") for sd in services_doc} - {"none"}
    if len(chosen) > 1:
        raise err("service.plugins", "all services share one controller, so they must use the same "
                  f"backend; got both {' and '.join(sorted(chosen))}")
    return ctrl_opts, services


ETCD_KEYS = {"endpoints", "prefix", "lease_ttl", "op_timeout"}


def _etcd_backend(table, err):
    """The etcd.Backend of an ``[etcd]`` table (endpoints, prefix, lease_ttl,
    op_timeout), or None without one."""
    if table is None:
        return None
    if not isinstance(table, dict):
        raise err("etcd", "expected a table [etcd]")
    for k in table:
        if k not in ETCD_KEYS:
            raise err(f"etcd.{k}", f"unknown key; expected one of {sorted(ETCD_KEYS)}")
    if "endpoints" not in table:
        raise err("etcd.endpoints", "required: a list of 'host:port' strings")
    try:
        from .etcd import Backend
    except ImportError as e:
        raise err("etcd", f"the etcd backend is not installed ({e}): pip install 'netplex_native[etcd]'") from None
    try:
        b = Backend(table["endpoints"], **{k: v for k, v in table.items() if k != "endpoints"})
    except (TypeError, ValueError) as e:
        raise err("etcd", str(e)) from None
    # the same table gives the same Backend (a reload keeps the plugins the controller has)
    return _ETCD_BACKENDS.setdefault((b.endpoints, b.prefix, b.lease_ttl, b.op_timeout), b)


_ETCD_BACKENDS: dict = {}
