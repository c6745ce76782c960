"""The in-instance launcher: runs *inside the app's own environment*, so it imports only the standard
library and uvicorn (which every app environment has; the builder makes sure of it).

    python launcher.py --app main:app --app-dir /path/to/src --host 127.0.0.1 --port 0 --ready-fd 3

It binds the socket itself (port 0 = the kernel picks a free one, so there is no race between choosing
a port and binding it), runs uvicorn with the app's lifespan, and only once the lifespan startup has
finished writes one JSON line ``{"port": N, "pid": P}`` to the ready file descriptor. The control plane
then probes the health path before routing to the instance.

Template mode (Linux) makes starting an instance a ``fork()`` instead of a fresh interpreter::

    python launcher.py --template --app main:app --app-dir D --workdir W --control-fd N

The template imports uvicorn and the app module (like ``gunicorn --preload``: module-level code runs once
per revision, in the template; the lifespan does not run there), then serves requests on the control
channel, a ``SOCK_SEQPACKET`` unix socket. Each message is one JSON object:

    backend -> template   {"op": "fork", "id": INSTANCE_ID}   + SCM_RIGHTS [stdout, stderr, ready] fds
    template -> backend   {"op": "ready", "pid": P}           the app imported; forks may follow
                          {"op": "unfit", "reason": "..."}    the app cannot be forked safely; exits
                          {"op": "forked", "id": ID, "pid": P} | {"op": "fork_failed", "id": ID, "error": E}
                          {"op": "exit", "pid": P, "exit_code": C}   a child was reaped (C < 0: signal)

The child of a fork becomes an ordinary instance: its own session, the passed pipes as stdout/stderr,
fresh random state, no fd of the template's, then exactly the serving code of the normal mode (a new
socket on port 0, a new event loop, uvicorn with ``lifespan="on"``, the ready line). The template is the
children's parent, so it reaps them and reports their exit codes; a child gets SIGKILL if the template
dies (``PR_SET_PDEATHSIG``): nobody would report its exit any more. When the control channel closes
(the control plane went away) the template stops its children gracefully (SIGTERM, then SIGKILL after
10 s) and exits.

The template refuses to serve forks ("unfit") when importing the app started threads or opened sockets or
an event loop: a forked child would share them.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import select
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any

_CHILD_STOP_GRACE = 10.0  # seconds a child gets to stop after SIGTERM when the control plane is gone
_PR_SET_PDEATHSIG = 1


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fastapi-deploy-launcher")
    parser.add_argument("--app", required=True, help="import string, module:attribute")
    parser.add_argument("--app-dir", required=True, help="directory put first on sys.path")
    parser.add_argument("--workdir", default="", help="working directory (default: --app-dir)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ready-fd", type=int, default=-1)
    parser.add_argument("--root-path", default="")
    parser.add_argument("--template", action="store_true", help="import the app, then fork instances")
    parser.add_argument("--control-fd", type=int, default=-1, help="template mode: the control socket")
    # Unused by the launcher; it names the instance (or template) in the process table so that a
    # restarted control plane can find (and clean up) the processes it started.
    parser.add_argument("--instance-id", default="")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    # Only stdio and the fd we were given: uvloop's spawn leaks copies of the stdio pipes (and its
    # /dev/null) into children, and a template must not hand anything unknown down to its forks.
    _close_inherited_fds(keep=(args.control_fd if args.template else args.ready_fd,))
    # Like FastAPI CLI: the import directory goes on sys.path, the project root is the working
    # directory (relative paths to templates or static files resolve against it).
    os.chdir(args.workdir or args.app_dir)
    # The launcher's own folder (sys.path[0] for a script) is the platform's, not the app's: an import
    # the app cannot satisfy must fail, not find one of our modules.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    sys.path.insert(0, args.app_dir)
    # Line-buffered output so each log line reaches the platform as it is written.
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    sys.stderr.reconfigure(line_buffering=True)  # type: ignore[union-attr]

    telemetry = _telemetry()  # before the app is imported: it patches the libraries the app uses
    if args.template:
        outcome = _Template(args, telemetry).run()
        if isinstance(outcome, int):
            return outcome  # the template itself is done
        # From here on this process is a forked instance.
        return _serve(outcome.config, args.host, args.port, outcome.ready_fd, telemetry)
    config = _make_config(args.app, args.root_path)
    if telemetry is not None:
        config.load()  # an import error exits here (status 1), after uvicorn printed why
        _wrap(telemetry, config)
    return _serve(config, args.host, args.port, args.ready_fd, telemetry)


def _telemetry() -> Any:
    """``runtime/instrument.py`` (loaded by path, beside this file) prepared, or None: tracing is off
    when the control plane did not ask for it, and never stops the app from starting."""
    if not os.environ.get("FASTAPI_DEPLOY_OTLP_ENDPOINT"):
        return None
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "instrument.py")
    try:
        spec = importlib.util.spec_from_file_location("_fastapi_deploy_instrument", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.prepare()
    except Exception as exc:
        print(f"fastapi-deploy: tracing is off: {exc!r}", file=sys.stderr, flush=True)
        return None


def _wrap(telemetry: Any, config: Any) -> None:
    try:
        telemetry.wrap(config)
    except Exception as exc:
        print(f"fastapi-deploy: the app is not traced: {exc!r}", file=sys.stderr, flush=True)


def _close_inherited_fds(keep: tuple[int, ...]) -> None:
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        return  # not Linux: nothing known to leak
    for fd in fds:
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass  # the listing's own fd, already closed


def _make_config(app: str, root_path: str) -> Any:
    import uvicorn

    return uvicorn.Config(
        app,
        lifespan="on",  # a failing lifespan startup must fail the instance, visibly
        proxy_headers=True,
        # The router's address: loopback for processes; a container sees its network's gateway.
        forwarded_allow_ips=os.environ.get("FASTAPI_DEPLOY_FORWARDED_ALLOW_IPS", "127.0.0.1"),
        root_path=root_path,
        timeout_keep_alive=5,
        access_log=True,
        server_header=False,
        log_config=_log_config(),
    )


# -- request correlation: the access log says which request (and trace) each line is ----------------

_REQUEST: Any = None  # contextvars.ContextVar[tuple[str, str]], created on first use
_IDS: Any = None  # with tracing on: the server spans' own note of the request's ids (one variable, not two)


class _RequestFilter:
    """Gives every access-log record the ``request_id`` and ``trace_id`` of the request being served
    (set by :class:`_Correlate`, or with tracing on by ``instrument.ServerSpans``; "-" outside a
    request)."""

    def filter(self, record: Any) -> bool:
        if _IDS is not None:
            request_id, trace_id = _IDS()
        else:
            request_id, trace_id = _REQUEST.get() if _REQUEST is not None else ("-", "-")
        record.request_id = request_id
        record.trace_id = trace_id
        return True


class _Correlate:
    """The outermost ASGI layer: remembers the router's ``X-Request-ID`` and the trace id of
    ``traceparent`` for the duration of the request (two header lookups, one context variable)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = trace_id = "-"
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                request_id = value.decode("latin-1")
            elif name == b"traceparent" and len(value) >= 35:
                trace_id = value[3:35].decode("latin-1")
        token = _REQUEST.set((request_id, trace_id))
        try:
            await self.app(scope, receive, send)
        finally:
            _REQUEST.reset(token)


def _log_config() -> Any:
    """uvicorn's logging, with the request's ids at the end of each access-log line."""
    global _REQUEST
    import contextvars
    import copy

    try:
        from uvicorn.config import LOGGING_CONFIG
    except ImportError:
        return None
    if _REQUEST is None:
        _REQUEST = contextvars.ContextVar("fastapi_deploy_request", default=("-", "-"))
    config = copy.deepcopy(LOGGING_CONFIG)
    try:
        access = config["formatters"]["access"]
        access["fmt"] = access["fmt"] + " request_id=%(request_id)s trace_id=%(trace_id)s"
        config.setdefault("filters", {})["fastapi_deploy_request"] = {"()": _RequestFilter}
        config["handlers"]["access"]["filters"] = ["fastapi_deploy_request"]
    except (KeyError, TypeError):
        return LOGGING_CONFIG  # a uvicorn whose logging looks different: plain access logs
    return config


def _serve(config: Any, host: str, port: int, ready_fd: int, telemetry: Any = None) -> int:
    """Bind, run uvicorn until it is told to stop, report readiness after the lifespan startup."""
    import uvicorn

    global _IDS
    if not config.loaded:
        config.load()  # an import error exits here, as uvicorn would (its message is in the output)
    if telemetry is not None:
        try:
            telemetry.start()  # its exporter thread: here, never in a template (threads don't fork)
        except Exception as exc:
            print(f"fastapi-deploy: tracing is off: {exc!r}", file=sys.stderr, flush=True)
            telemetry = None
    if telemetry is not None and getattr(telemetry, "request_ids", None) is not None:
        _IDS = telemetry.request_ids  # the server spans note the ids already
    elif _REQUEST is not None and not isinstance(config.loaded_app, _Correlate):
        config.loaded_app = _Correlate(config.loaded_app)

    # proto=IPPROTO_TCP matters: asyncio (and uvloop) only set TCP_NODELAY on accepted sockets whose
    # proto says TCP; with proto 0, Nagle plus the client's delayed ACK add ~40 ms to every response.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(False)
    bound_port = sock.getsockname()[1]

    class _Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            if telemetry is not None and not self.should_exit:
                telemetry.watch_loop()  # in the serving process's loop, after any fork
            if self.should_exit or ready_fd < 0:
                return
            try:
                os.write(ready_fd, (json.dumps({"port": bound_port, "pid": os.getpid()}) + "\n").encode())
                os.close(ready_fd)
            except OSError:
                pass

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            await super().shutdown(sockets=sockets)
            if telemetry is not None:
                await telemetry.unwatch_loop()

    server = _Server(config)
    # The app, its libraries (and the tracing layer's) are loaded: as in a template (below), their
    # objects live as long as the process, so the collector stops walking them. Without this every
    # full collection, a few a second under load, rescans the whole import: tens of milliseconds each,
    # stalling the loop, and twice that with the OpenTelemetry SDK and its protobuf classes loaded.
    gc.freeze()
    try:
        asyncio.run(server.serve(sockets=[sock]))  # always a new event loop
    except KeyboardInterrupt:
        pass
    finally:
        if telemetry is not None:
            telemetry.shutdown()
    if not server.started:
        return 3
    return 0


# -- template mode --------------------------------------------------------------------------------------


@dataclass
class _Forked:
    """What a forked child takes out of the template: the loaded config and where to report readiness."""

    config: Any
    ready_fd: int


class _Unfit(Exception):
    pass


class _Template:
    def __init__(self, args: argparse.Namespace, telemetry: Any = None) -> None:
        self.args = args
        self.telemetry = telemetry
        self.control = socket.socket(fileno=args.control_fd)
        self.control.set_inheritable(False)
        self.pid = os.getpid()
        self.children: dict[int, int] = {}  # pid -> pidfd (-1 without pidfd support)
        self.poller = select.poll()  # poll(2) keeps no kernel object: nothing to leak into children
        self.has_pidfd = hasattr(os, "pidfd_open")
        self.libc: Any = None

    def run(self) -> int | _Forked:
        try:
            config = _make_config(self.args.app, self.args.root_path)
            config.load()  # imports the app module and uvicorn's protocol classes; no lifespan, no loop
        except BaseException:  # SystemExit too: uvicorn exits on an import error
            traceback.print_exc()
            sys.stdout.flush()
            sys.stderr.flush()
            return 3
        if self.telemetry is not None:
            _wrap(self.telemetry, config)  # middleware objects only: forked children inherit them
        try:
            self._check_fit()
        except _Unfit as exc:
            self._send({"op": "unfit", "reason": str(exc)})
            return 0
        try:
            import ctypes

            self.libc = ctypes.CDLL(None, use_errno=True)
        except (ImportError, OSError):
            self.libc = None  # no PR_SET_PDEATHSIG: the control plane kills orphans itself
        import gc

        # Objects from the import are never freed; freezing them keeps the collector from touching
        # (and so copying) their pages in every child.
        gc.freeze()
        self._send({"op": "ready", "pid": self.pid})
        return self._loop(config)

    # -- the loop ---------------------------------------------------------------------------------------

    def _loop(self, config: Any) -> int | _Forked:
        self.poller.register(self.control.fileno(), select.POLLIN)
        by_pidfd: dict[int, int] = {}
        while True:
            # Without pidfds, children are polled for every 50 ms.
            events = self.poller.poll(None if self.has_pidfd else 50)
            for fd, _mask in events:
                if fd == self.control.fileno():
                    try:
                        msg, fds, _flags, _addr = socket.recv_fds(self.control, 65536, 8)
                    except OSError:
                        msg, fds = b"", []
                    if not msg:
                        for extra in fds:
                            os.close(extra)
                        self._stop_children()
                        return 0
                    forked = self._handle(msg, fds, config)
                    if forked is not None:
                        return forked
                elif fd in by_pidfd:
                    self._reap(by_pidfd.pop(fd), fd)
            if not self.has_pidfd:
                for pid in list(self.children):
                    self._reap(pid, -1, block=False)
            # Register pidfds of new children.
            for pid, pidfd in self.children.items():
                if pidfd >= 0 and pidfd not in by_pidfd:
                    by_pidfd[pidfd] = pid
                    self.poller.register(pidfd, select.POLLIN)

    def _handle(self, msg: bytes, fds: list[int], config: Any) -> _Forked | None:
        try:
            request = json.loads(msg)
            op, instance_id = request["op"], str(request["id"])
        except (ValueError, KeyError, TypeError):
            for fd in fds:
                os.close(fd)
            return None
        if op != "fork" or len(fds) != 3:
            for fd in fds:
                os.close(fd)
            self._send({"op": "fork_failed", "id": instance_id, "error": "bad request"})
            return None
        # Nothing buffered may be written twice (once by the child).
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = os.fork()
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            self._send({"op": "fork_failed", "id": instance_id, "error": str(exc)})
            return None
        if pid == 0:
            try:
                return self._become_instance(instance_id, fds, config)
            except BaseException:
                traceback.print_exc()
                os._exit(70)
        for fd in fds:
            os.close(fd)
        pidfd = -1
        if self.has_pidfd:
            try:
                pidfd = os.pidfd_open(pid)  # works on a child that already exited (not yet reaped)
            except OSError:
                self.has_pidfd = False
        self.children[pid] = pidfd
        self._send({"op": "forked", "id": instance_id, "pid": pid})
        return None

    def _reap(self, pid: int, pidfd: int, *, block: bool = True) -> None:
        try:
            waited, status = os.waitpid(pid, 0 if block else os.WNOHANG)
        except ChildProcessError:
            waited, status = pid, 255 << 8
        if waited == 0:
            return
        if pidfd >= 0:
            self.poller.unregister(pidfd)
            os.close(pidfd)
        self.children.pop(pid, None)
        self._send({"op": "exit", "pid": pid, "exit_code": os.waitstatus_to_exitcode(status)})

    def _stop_children(self) -> None:
        """The control plane is gone: stop every child gracefully, then forcefully; reap them all."""
        for pid in self.children:
            _signal_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + _CHILD_STOP_GRACE
        while self.children and time.monotonic() < deadline:
            for pid in list(self.children):
                try:
                    waited, _status = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    waited = pid
                if waited:
                    self.children.pop(pid)
            if self.children:
                time.sleep(0.02)
        for pid in self.children:
            _signal_group(pid, signal.SIGKILL)
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        self.children.clear()

    def _send(self, message: dict[str, object]) -> None:
        try:
            self.control.send(json.dumps(message).encode())
        except OSError:
            pass  # the control plane is gone; the next read sees it

    # -- fitness ----------------------------------------------------------------------------------------

    def _check_fit(self) -> None:
        import threading

        if threading.active_count() > 1:
            names = ", ".join(t.name for t in threading.enumerate() if t is not threading.main_thread())
            raise _Unfit(f"importing the app started threads ({names}); forking would copy them half-way")
        shared = []
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            if fd in (0, 1, 2, self.control.fileno()):
                continue
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue  # the directory listing's own fd, already closed
            if target.startswith("socket:") or target in ("anon_inode:[eventpoll]", "anon_inode:[eventfd]"):
                shared.append(target)
        if shared:
            raise _Unfit(
                f"importing the app opened sockets or an event loop ({', '.join(shared)}); "
                "forked instances would share them"
            )

    # -- in the child -----------------------------------------------------------------------------------

    def _become_instance(self, instance_id: str, fds: list[int], config: Any) -> _Forked:
        os.setsid()  # own session and process group: the control plane stops it with killpg
        if self.libc is not None:
            self.libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != self.pid:
            os._exit(70)  # the template died before the death signal was armed
        # Nothing of the template's: its control channel, its other children's pidfds.
        self.control.close()
        for pidfd in self.children.values():
            if pidfd >= 0:
                os.close(pidfd)
        self.children.clear()
        out_fd, err_fd, ready_fd = fds
        os.dup2(out_fd, 1)
        os.dup2(err_fd, 2)
        os.close(out_fd)
        os.close(err_fd)
        os.environ["FASTAPI_DEPLOY_INSTANCE_ID"] = instance_id
        _reseed()
        return _Forked(config=config, ready_fd=ready_fd)


def _reseed() -> None:
    """Fresh random state: ``random`` reseeds itself at fork, but say it; numpy's global state does not."""
    random_module = sys.modules.get("random")
    if random_module is not None:
        random_module.seed()
    numpy_random = sys.modules.get("numpy.random")
    if numpy_random is not None:
        try:
            numpy_random.seed()
        except Exception:
            pass


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


if __name__ == "__main__":
    sys.exit(main())
