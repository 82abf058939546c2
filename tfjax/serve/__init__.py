"""`python -m tfjax serve`: trained workdirs behind an HTTP server with dynamic batching.

`Server` holds the models and their batchers, `create_app` makes the Starlette app, `run`
serves it with uvicorn until SIGTERM or Ctrl-C, after which in-flight requests are answered
before the process exits 0.
"""

from __future__ import annotations

import signal
import socket
import sys
from collections.abc import Sequence

from tfjax.serve.app import Server, ServerConfig, create_app
from tfjax.serve.batching import Batcher, ContinuousBatcher, Job, QueueFull
from tfjax.serve.models import Served, load

__all__ = [
    "Batcher",
    "ContinuousBatcher",
    "Job",
    "QueueFull",
    "Served",
    "Server",
    "ServerConfig",
    "create_app",
    "listen",
    "load",
    "run",
    "warm_up",
]


def warm_up(served: Sequence[Served], continuous: bool = True) -> None:
    """Compile each seq2seq model's greedy decoder for every batch and length bucket
    (`Translator.warm_up`), and its continuous decoder's programs (`warm_up_continuous`),
    before the first request."""
    for m in served:
        if m.seq2seq:
            shapes = m.translator.warm_up()
            if continuous:
                shapes += m.translator.warm_up_continuous()
            print(f"{m.name}: compiled {shapes} decoder programs", file=sys.stderr, flush=True)


def listen(host: str = "127.0.0.1", port: int = 8080) -> socket.socket:
    """A socket bound to host:port and listening (any free port when port is 0).

    `serve` calls this before loading any model, so a port already in use is refused in a
    second, not after minutes of loading and compiling.
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror}") from e
    sock.listen(2048)
    return sock


def run(server: Server, sock: socket.socket) -> None:
    """Serve on a `listen` socket until SIGTERM or SIGINT, then answer what is in flight and
    return.

    The socket is listening before this prints "serving on http://HOST:PORT" (the real port
    when it was bound to port 0), so a client may connect as soon as it reads the line.
    """
    import uvicorn

    host, bound = sock.getsockname()[:2]
    config = uvicorn.Config(create_app(server), log_level="warning", timeout_graceful_shutdown=None)
    # uvicorn re-raises the signal that stopped it once it has shut down gracefully, which
    # under the default SIGTERM handler would end the process with status 143; with this
    # handler in place the shutdown it already did is the whole answer to SIGTERM.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    print(f"serving on http://{host}:{bound}", file=sys.stderr, flush=True)
    uvicorn.Server(config).run(sockets=[sock])
