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

A reload (``FileSource``, the controller's ``config_source`` for ``run``)
first loads the file in a throwaway trial process (config_check.py: a
module that ends the process, forks or hangs at import fails the reload
there, never in the controller), then reads the file again in a thread of
the controller and imports the modules
it names anew, each into a new module object from its source (never the
bytecode cache, which a quick rewrite of the same size can leave stale):
the running services' modules are never changed in place.  The new modules
are in ``sys.modules`` while they load; the controller keeps them when it
applies the load and ``discard()`` puts the old ones back when it does not
(invalid, timed out: a timed-out load's later imports are refused).  A
process forked while a load is in flight (a container restarted meanwhile)
gets the old ones back at once, so it runs the running configuration's code.
Not covered: a module that the load imports for the first time (normally)
while the fork happens is left half-initialized in that child.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys
import threading
import tomllib
import weakref

from . import options
from .errors import ServiceConfigError
from .hooks import ProcessorHooks
from .service import Service, parse_address

SERVICE_KEYS = {"name", "handler", "hooks", "address", "workers", "plugins", "max_connections",
                "max_connections_jitter", "connections_per_container", "min_free_connections",
                "max_free_connections"}
CONTROLLER_KEYS = {"socket_dir", "max_start_failures", "shutdown_timeout", "startup_timeout",
                   "reload_timeout"}
PLUGIN_CHOICES = ("native", "rpc", "none", "etcd")


class _Err:
    def __init__(self, path):
        self.path = path

    def __call__(self, where: str, msg: str) -> ServiceConfigError:
        return ServiceConfigError(f"{self.path}: {where}: {msg}")


class ModuleSwap:
    """The modules one reload imports anew.  Each is a new module object,
    executed from its source, put in ``sys.modules`` before it runs (as an
    import does); ``restore()`` puts back the modules they replaced and
    refuses this load's later imports (a load that timed out goes on in
    its thread)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._old: dict = {}        # name -> the module it replaced (None: there was none)
        self._new: dict = {}
        self._closed = False
        _in_flight.add(self)

    def fresh_import(self, name: str):
        if name in self._new:
            return self._new[name]
        parent = name.rpartition(".")[0]
        path = importlib.import_module(parent).__path__ if parent else None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        module = importlib.util.module_from_spec(spec)
        with self._lock:
            if self._closed:
                raise RuntimeError("this configuration load was abandoned")
            self._old.setdefault(name, sys.modules.get(name))
            sys.modules[name] = module
        loader = spec.loader
        if isinstance(loader, importlib.machinery.SourceFileLoader):
            code = loader.source_to_code(loader.get_data(spec.origin), spec.origin)
            exec(code, module.__dict__)
        elif loader is not None:
            loader.exec_module(module)
        self._new[name] = module
        return module

    def keep(self) -> None:
        """The load is applied: its modules stay."""
        with self._lock:
            self._closed = True
            self._old.clear()
        _in_flight.discard(self)

    def restore(self) -> None:
        with self._lock:
            self._restore()

    def _restore(self) -> None:
        self._closed = True
        for name, old in self._old.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
        self._old.clear()
        _in_flight.discard(self)


#: Loads neither kept nor restored yet.
_in_flight: "weakref.WeakSet[ModuleSwap]" = weakref.WeakSet()


def _restore_in_child() -> None:
    """A child forked while a load was in flight: the old modules back (the
    loading thread is not in the child, and may have held the lock)."""
    for swap in list(_in_flight):
        swap._lock = threading.Lock()
        swap._restore()


os.register_at_fork(after_in_child=_restore_in_child)


def _resolve(ref, where, err, swap=None):
    """*swap*: a reload's ModuleSwap (the modules are imported anew,
    except netplex_native's own)."""
    if not isinstance(ref, str) or ref.count(":") != 1:
        raise err(where, f"expected \"module:name\", got {ref!r}")
    mod_name, _, attr = ref.partition(":")
    try:
        if swap is not None and mod_name.partition(".")[0] != "netplex_native":
            mod = swap.fresh_import(mod_name)
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


def load(path: str, swap: ModuleSwap | None = None) -> tuple[dict, list[Service]]:
    """Parse and validate *path*; returns (controller options, services).
    *swap*: a reload's, to import the handler and hooks modules anew."""
    err = _Err(path)
    if swap is not None:
        importlib.invalidate_caches()   # modules made since the last import are found
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
    for k, v in ctrl_opts.items():     # the checks Controller() makes (options.py)
        try:
            options.TOML_CHECKS[k](k, v)
        except (TypeError, ValueError):
            raise err(f"controller.{k}", f"expected {options.EXPECTED[k]}, got {v!r}") from None
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
            handler = _resolve(sd["handler"], f"{where}.handler", err, swap)
        hooks = ProcessorHooks()
        if "hooks" in sd:
            cls = _resolve(sd["hooks"], f"{where}.hooks", err, swap)
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


class FileSource:
    """``run``'s ``config_source``: the file read again at each reload, in
    the controller's loading thread; its ``[controller]`` options (but
    ``socket_dir``, fixed at start) take effect when the load is applied."""

    def __init__(self, path: str, backend: str, socket_dir, check_timeout: float = 30.0):
        self.path = path
        self.backend = backend
        self.socket_dir = socket_dir
        self.check_timeout = check_timeout      # the trial load's (reload_timeout)
        self._swap: ModuleSwap | None = None
        self._opts: dict = {}

    def check(self) -> None:
        """The trial load in a throwaway process (config_check.py): raises
        ValueError when it fails, ends the process or forks, TimeoutError
        when it takes more than ``check_timeout`` (it is then killed)."""
        import json
        import subprocess
        import tempfile
        from .config_check import PATH_ENV
        with tempfile.TemporaryDirectory(prefix="netplex-check-") as d:
            result, errlog = os.path.join(d, "result.json"), os.path.join(d, "stderr")
            env = dict(os.environ, **{PATH_ENV: json.dumps(sys.path)})
            with open(errlog, "wb") as err_f:
                p = subprocess.Popen([sys.executable, "-m", "netplex_native.config_check", self.path, result],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err_f,
                                     env=env, close_fds=True)
                try:
                    code = p.wait(self.check_timeout)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
                    raise TimeoutError(f"{self.path}: loading it (importing its modules) did not finish "
                                       f"within {self.check_timeout:g} s in a trial process") from None
            try:
                with open(result) as f:
                    outcome = json.load(f)
            except (OSError, ValueError):
                with open(errlog, "rb") as f:
                    tail = f.read()[-300:].decode(errors="replace").strip().splitlines()
                how = f"exited with code {code}" if code >= 0 else f"was killed by signal {-code}"
                raise ValueError(f"{self.path}: the trial load {how} before it finished (a module "
                                 "ends the process at import?)" + (f": {tail[-1]}" if tail else "")) from None
        if not outcome.get("ok"):
            raise ValueError(outcome.get("error") or f"{self.path}: the trial load failed")

    def __call__(self) -> list[Service]:
        self.check()            # import-time os._exit, fork, hang: caught outside the controller
        swap = self._swap = ModuleSwap()
        opts, services = load(self.path, swap)
        if backend(services) != self.backend:
            raise ValueError(f"{self.path}: plugins changed from {self.backend} to "
                             f"{backend(services)}; that needs a restart")
        self._opts = opts
        return services

    def discard(self) -> None:
        if self._swap is not None:
            self._swap.restore()
            self._swap = None

    def applied(self, ctrl) -> None:
        import logging
        if self._swap is not None:
            self._swap.keep()
            self._swap = None
        opts = self._opts
        if opts.get("socket_dir", self.socket_dir) != self.socket_dir:
            logging.getLogger("netplex_native.cli").warning(
                "%s: controller.socket_dir changed; it takes effect at the next start", self.path)
        ctrl.max_start_failures = opts.get("max_start_failures", 10)
        ctrl.shutdown_timeout = opts.get("shutdown_timeout", 5.0)
        ctrl.startup_timeout = opts.get("startup_timeout")
        ctrl.reload_timeout = self.check_timeout = opts.get("reload_timeout", 30.0)


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
