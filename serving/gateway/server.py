"""Run the gateway app with uvicorn in a background thread of ``pissa serve`` (one process to stop).

The public socket is bound in :meth:`GatewayServer.bind`, before vLLM starts, so a taken port fails
at once and nothing can take the port while vLLM loads.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass, field

from pissa.core.errors import ServingError
from serving.gateway.app import Gateway

logger = logging.getLogger(__name__)


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready socket on ``host:port``.

    Raises:
        ServingError: the address cannot be bound.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ServingError(f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                           fix="choose another gateway.port or stop what uses it") from None
    return sock


@dataclass
class GatewayServer:
    gateway: Gateway
    sock: socket.socket
    _thread: threading.Thread | None = field(default=None, init=False)
    _server: object = field(default=None, init=False)

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def start(self, timeout: float = 30.0) -> None:
        """Serve in a thread; return once uvicorn accepts connections.

        Raises:
            ServingError: uvicorn did not start.
        """
        import uvicorn

        config = uvicorn.Config(self.gateway.app(), log_level="warning", access_log=False, lifespan="on",
                                ws="none", timeout_graceful_shutdown=5, server_header=False)
        server = uvicorn.Server(config)
        self._server = server
        self._thread = threading.Thread(target=server.run, kwargs={"sockets": [self.sock]},
                                        name="pissa-gateway", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise ServingError("the gateway did not start (see the log above)",
                                   fix="rerun with -v; check gateway.host and gateway.port")
            time.sleep(0.02)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        """Stop accepting, finish (or cut after 5 s) what is in flight, write pending usage."""
        server = self._server
        if server is not None:
            server.should_exit = True  # type: ignore[attr-defined]
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.sock.close()
