"""The ``netplex-native`` command (also ``python -m netplex_native``).

    netplex-native demo [--duration S] [--chaos] [--workers N] [--backend native|rpc]
    netplex-native run CONFIG.toml [--name NAME] [--socket-dir DIR] [--pid FILE]
    netplex-native admin [--name NAME | --socket-dir DIR] [--json] VERB [ARGS...]
    netplex-native bench [--quick] ...
    netplex-native --version

``--log-level`` on every command; logs go to stderr (``run --log-file``:
to a file, reopened on SIGUSR1), one line per event with the logger, the
process id, the service and the container id (``-`` in the controller).

Where a controller's admin socket is: ``--socket-dir``, else the directory
of its NAME under ``controller.runtime_dir()`` (``run``: the config file's
name without ``.toml``; a script's ``Controller()``: the script's name and
pid).  ``admin`` without either finds the one controller running there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import NetplexError


def running_controllers() -> list[str]:
    """Names of the controllers whose admin socket answers under runtime_dir()."""
    from .controller import _admin_socket_live, runtime_dir
    base = runtime_dir()
    try:
        names = sorted(os.listdir(base))
    except OSError:
        return []
    return [n for n in names if _admin_socket_live(os.path.join(base, n))]


def _admin_socket_dir(args) -> str:
    from .controller import check_controller_name, default_socket_dir, runtime_dir
    if args.socket_dir:
        return args.socket_dir
    if args.name:
        try:
            return default_socket_dir(check_controller_name(args.name))
        except ValueError as e:
            raise NetplexError(f"--name: {e}") from None
    names = running_controllers()
    if len(names) == 1:
        return default_socket_dir(names[0])
    if not names:
        raise NetplexError(f"no controller is running under {runtime_dir()}; "
                           "pass --socket-dir DIR for one started with a socket directory")
    raise NetplexError(f"{len(names)} controllers are running ({', '.join(names)}); pick one with --name NAME")


def _write_pid_file(path: str) -> None:
    """gunicorn's --pid: refused while the pid it names is alive."""
    try:
        with open(path) as f:
            old = int(f.read().strip() or 0)
    except FileNotFoundError:
        old = 0
    except (OSError, ValueError) as e:
        raise NetplexError(f"--pid {path}: cannot read the existing file: {e}") from None
    if old and old != os.getpid():
        try:
            os.kill(old, 0)
            raise NetplexError(f"--pid {path}: already running as pid {old}")
        except ProcessLookupError:
            pass
        except PermissionError:
            raise NetplexError(f"--pid {path}: already running as pid {old}") from None
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(tmp, path)
    except OSError as e:
        raise NetplexError(f"--pid {path}: {e.strerror or e}") from None


def _remove_pid_file(path: str) -> None:
    try:
        with open(path) as f:
            if f.read().strip() != str(os.getpid()):
                return
        os.unlink(path)
    except (OSError, ValueError):
        pass


def _setup_logging(level: str, log_file: str | None = None) -> None:
    from .logs import setup
    setup(level, log_file)


def _native_or_rpc(backend: str) -> str:
    if backend != "native":
        return backend
    try:
        from .native import domain as _native
        if _native.available():
            return "native"
    except ImportError:
        pass
    print("notice: the native core is not built; using the RPC backend", file=sys.stderr)
    return "rpc"


def cmd_demo(args) -> int:
    from . import demo
    backend = _native_or_rpc(args.backend)
    ctrl = demo.build(workers=args.workers, backend=backend, duration=args.duration, chaos=args.chaos,
                      chaos_every=args.chaos_every, port=args.port, rate=args.rate,
                      socket_dir=args.socket_dir)
    ctrl.run()
    return 0


def cmd_run(args) -> int:
    from . import config
    from .controller import Controller
    opts, services = config.load(args.config)
    socket_dir = args.socket_dir or opts.get("socket_dir")
    name = args.name or os.path.splitext(os.path.basename(args.config))[0]
    source = config.FileSource(args.config, config.backend(services), opts.get("socket_dir"),
                               check_timeout=opts.get("reload_timeout", 30.0))

    from .controller import check_controller_name
    try:
        check_controller_name(name)
    except ValueError as e:
        raise NetplexError(f"--name: {e}") from None
    ctrl = Controller(socket_dir, max_start_failures=opts.get("max_start_failures", 10),
                      shutdown_timeout=opts.get("shutdown_timeout", 5.0), config_source=source,
                      name=name, startup_timeout=opts.get("startup_timeout"),
                      reload_timeout=opts.get("reload_timeout", 30.0))
    if socket_dir is not None:      # one that cannot be made: named as the other errors
        from .controller import _private_dir
        try:
            _private_dir(os.path.abspath(socket_dir))
        except OSError as e:
            where = "--socket-dir" if args.socket_dir else f"{args.config}: controller.socket_dir"
            raise NetplexError(f"{where}: cannot create {socket_dir}: {e.strerror or e}") from None
    for s in services:
        ctrl.add_service(s)
    if args.pid:
        _write_pid_file(args.pid)
    try:
        ctrl.run()
    finally:
        if args.pid:
            _remove_pid_file(args.pid)
    return 0


def _exit_now(code: int) -> None:
    """The controller stopped and cleaned up: exit now, as gunicorn's
    arbiter does, even if a module started a non-daemon thread (the
    interpreter's exit would wait for it for ever).  Logs and stdio are
    flushed first."""
    import logging
    logging.shutdown()
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _print_list(r: dict) -> None:
    print(f"controller pid {r['pid']}  state {r['state']}  socket dir {r['socket_dir']}")
    print(f"plugins: {', '.join(r['plugins']) or '-'}")
    for s in r["services"]:
        flag = "  DISABLED" if s["disabled"] else ""
        flag += "" if s.get("accepting", True) else "  NOT ACCEPTING"
        print(f"\nservice {s['name']}  address {s['address'] or '-'}  workers {s['workers']}"
              f"  restarts {s['restarts']}{flag}")
        for c in s["containers"]:
            print(f"  {c['id']:<16} pid {c['pid']:<8} up {c['uptime']:>9.1f}s"
                  f"{'' if c['ready'] else '  (starting)'}{'  (retiring)' if c.get('retiring') else ''}")


def _print_inspect(r: dict) -> None:
    ids = r.get("containers", {})

    def who(x) -> str:
        """A holder: its container id (and pid), whichever the backend gave."""
        cid = ids.get(str(x))
        return f"{cid} (pid {x})" if cid else str(x)
    for name, data in r["plugins"].items():
        if not data:
            continue
        print(f"[{name}]")
        if "segment" in data:
            print(f"  segment {data['segment']} ({data['size']} bytes) capacity {data['config']}")
        for s in data.get("semaphores", []):
            holders = ", ".join(f"{who(k)}:{v}" for k, v in (s.get("holders") or {}).items()) or "-"
            print(f"  semaphore {s['name']:<28} value {s['value']:<6} "
                  f"{'protected' if s.get('protected') else 'unprotected':<12} "
                  f"waiters {s.get('waiters', 0):<3} holders {holders}")
        for m in data.get("mutexes", []):
            owner = m.get("owner", m.get("owner_pid"))
            print(f"  mutex     {m['name']:<28} {'locked by ' + who(owner) if m['locked'] else 'free':<24}"
                  f" waiters {m.get('waiters', 0)}")
        for v in data.get("sharedvars", []):
            print(f"  sharedvar {v['name']:<28} {'enc ' if v['enc'] else ''}owner {v['owner'] or '-'}"
                  f"{' ro' if v['ro'] else ''} value {v['value']!r}")


#: Seconds ``admin reload`` waits for its answer.
RELOAD_ANSWER_TIMEOUT = 300.0

_USAGE = {"message": "PATTERN NAME [ARGS...]", "restart": "SERVICE", "enable": "SERVICE",
          "disable": "SERVICE", "scale": "SERVICE WORKERS", "log-level": "LEVEL"}


def cmd_admin(args) -> int:
    from . import admin
    c = args.command
    a = args.args
    nargs = {"message": (2, None), "restart": (1, 1), "enable": (1, 1), "disable": (1, 1),
             "scale": (2, 2), "log-level": (1, 1)}.get(c, (0, 0))
    if len(a) < nargs[0] or (nargs[1] is not None and len(a) > nargs[1]):
        if nargs == (0, 0):
            print(f"admin {c} takes no arguments", file=sys.stderr)
        else:
            print(f"usage: netplex-native admin {c} {_USAGE[c]}", file=sys.stderr)
        return 2
    if c == "message":
        req = {"cmd": "message", "pattern": a[0], "name": a[1], "args": a[2:]}
    elif c in ("restart", "enable", "disable"):
        req = {"cmd": c, "service": a[0]}
    elif c == "scale":
        try:
            if not (a[1].isascii() and a[1].isdigit()):     # int() takes ' 3', '+3', '٣'
                raise ValueError(a[1])
            workers = int(a[1], 10)
        except ValueError:
            print(f"error: admin scale: WORKERS must be an integer between 1 and 4096, got {a[1]!r}",
                  file=sys.stderr)
            return 2
        req = {"cmd": "scale", "service": a[0], "workers": workers}
    elif c == "log-level":
        req = {"cmd": "log-level", "level": a[0].lower()}
    else:
        req = {"cmd": c}
    # a reload is answered once its configuration is loaded (up to the
    # controller's reload_timeout, after the operation in progress)
    r = admin.request(_admin_socket_dir(args), req, timeout=RELOAD_ANSWER_TIMEOUT if c == "reload" else 10.0)
    if args.json:
        print(json.dumps(r, indent=2))
    elif not r.get("ok"):
        pass
    elif c == "list":
        _print_list(r)
    elif c == "inspect":
        _print_inspect(r)
    elif c == "message":
        print(f"delivered to {r['delivered']} container(s)")
    elif c == "restart":
        print(f"restarting {r['restarted']} container(s) of {a[0]}")
    elif c == "restart-all":
        print(f"restarting {r['restarted']} container(s)")
    elif c in ("enable", "disable"):
        print(f"service {a[0]} {c}d" + ("" if r["changed"] else f" (already {c}d)"))
    elif c == "scale":
        print(f"service {a[0]}: workers {r['previous']} -> {req['workers']}")
    elif c == "reload":
        print("reload requested")
    elif c == "log-level":
        print(f"log level set to {a[0].lower()}")
    else:
        print("shutdown requested")
    if c == "message" and r.get("ok") and not r["delivered"]:
        r = {"ok": False, "error": f"no running container of a service matching {a[0]!r}"}
    if not r.get("ok"):
        print(f"error: {r.get('error')}", file=sys.stderr)
        return 1
    return 0


def cmd_bench(args) -> int:
    import runpy
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for base in (here, os.getcwd()):    # an editable install, or the current directory
        script = os.path.join(base, "bench", "run.py")
        if os.path.exists(script):
            break
    else:
        print("error: the benchmarks (bench/run.py) are not part of the installed package; "
              "run this command from the top directory of a netplex_native source checkout "
              "(pip install '.[bench]' there first), or there: python bench/run.py [--quick] ...",
              file=sys.stderr)
        return 1
    sys.argv = [script] + args.bench_args
    runpy.run_path(script, run_name="__main__")
    return 0


def _version() -> str:
    from importlib import metadata
    try:
        return metadata.version("netplex_native")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error", "critical"],
                        help="logging level (default: info)")
    p = argparse.ArgumentParser(prog="netplex-native", parents=[common],
                                description="Multi-process services with crash-safe primitives.")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", parents=[common], help="run the demo service")
    d.add_argument("--duration", type=float, default=None, help="stop after SECONDS (default: until Ctrl-C)")
    d.add_argument("--chaos", action="store_true", help="SIGKILL the job's owner every few seconds")
    d.add_argument("--chaos-every", type=float, default=3.0, metavar="SECONDS")
    d.add_argument("--workers", type=int, default=4)
    d.add_argument("--backend", choices=["native", "rpc"], default="native")
    d.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (default: any free port)")
    d.add_argument("--rate", type=float, default=20.0, help="monitor requests per second")
    d.add_argument("--socket-dir", default=None)
    d.set_defaults(func=cmd_demo)

    r = sub.add_parser("run", parents=[common], help="run the services of a TOML file")
    r.add_argument("config")
    r.add_argument("--socket-dir", default=None, help="admin socket directory (default: NAME's, see admin)")
    r.add_argument("--name", default=None, help="controller name (default: the config file's name)")
    r.add_argument("--pid", default=None, metavar="FILE", help="write the controller's pid to FILE")
    r.add_argument("--log-file", default=None, metavar="FILE",
                   help="append the log to FILE instead of stderr (reopened on SIGUSR1)")
    r.set_defaults(func=cmd_run)

    a = sub.add_parser("admin", parents=[common], help="administer a running controller")
    a.add_argument("--socket-dir", default=None)
    a.add_argument("--name", default=None,
                   help="the controller's name (default: the only one running for this user)")
    a.add_argument("--json", action="store_true", help="machine-readable output")
    a.add_argument("command", choices=["list", "inspect", "message", "restart", "restart-all", "enable",
                                       "disable", "scale", "reload", "log-level", "shutdown"])
    a.add_argument("args", nargs="*")
    a.set_defaults(func=cmd_admin)

    b = sub.add_parser("bench", parents=[common], help="run the benchmarks (bench/run.py [--quick] ...)")
    b.set_defaults(func=cmd_bench, bench_args=[])
    return p


def main(argv=None) -> int:
    p = parser()
    args, extra = p.parse_known_args(argv)
    if args.cmd == "bench":
        args.bench_args = extra          # bench/run.py parses its own options
    elif extra:
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        _setup_logging(args.log_level, getattr(args, "log_file", None))
    except OSError as e:
        print(f"error: --log-file {args.log_file}: {e.strerror or e}", file=sys.stderr)
        return 2
    if args.cmd == "demo" and args.workers < 1:
        print("error: --workers must be at least 1", file=sys.stderr)
        return 2
    try:
        code = args.func(args)
    except NetplexError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    if args.cmd == "run":
        _exit_now(code)     # a module's non-daemon thread must not keep the process
    return code


if __name__ == "__main__":
    sys.exit(main())
