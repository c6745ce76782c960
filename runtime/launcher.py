"""The in-instance launcher: runs *inside the app's own environment*, so it imports only the standard
library and uvicorn (which every app environment has; the builder makes sure of it).

    python launcher.py --app main:app --app-dir /path/to/src --host 127.0.0.1 --port 0 --ready-fd 3

It binds the socket itself (port 0 = the kernel picks a free one, so there is no race between choosing
a port and binding it), runs uvicorn with the app's lifespan, and only once the lifespan startup has
finished writes one JSON line ``{"port": N, "pid": P}`` to the ready file descriptor. The control plane
then probes the health path before routing to the instance.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fastapi-deploy-launcher")
    parser.add_argument("--app", required=True, help="import string, module:attribute")
    parser.add_argument("--app-dir", required=True, help="directory put first on sys.path")
    parser.add_argument("--workdir", default="", help="working directory (default: --app-dir)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ready-fd", type=int, default=-1)
    parser.add_argument("--root-path", default="")
    # Unused by the launcher; it names the instance in the process table so that a restarted control
    # plane can find (and clean up) the instances it started.
    parser.add_argument("--instance-id", default="")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    # Like FastAPI CLI: the import directory goes on sys.path, the project root is the working
    # directory (relative paths to templates or static files resolve against it).
    os.chdir(args.workdir or args.app_dir)
    sys.path.insert(0, args.app_dir)
    # Line-buffered output so each log line reaches the platform as it is written.
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    sys.stderr.reconfigure(line_buffering=True)  # type: ignore[union-attr]

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.set_inheritable(False)
    port = sock.getsockname()[1]

    config = uvicorn.Config(
        args.app,
        lifespan="on",  # a failing lifespan startup must fail the instance, visibly
        proxy_headers=True,
        forwarded_allow_ips="127.0.0.1",
        root_path=args.root_path,
        timeout_keep_alive=5,
        access_log=True,
        server_header=False,
    )
    ready_fd = args.ready_fd

    class _Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            if self.should_exit or ready_fd < 0:
                return
            try:
                os.write(ready_fd, (json.dumps({"port": port, "pid": os.getpid()}) + "\n").encode())
                os.close(ready_fd)
            except OSError:
                pass

    server = _Server(config)
    try:
        asyncio.run(server.serve(sockets=[sock]))
    except KeyboardInterrupt:
        pass
    if not server.started:
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
