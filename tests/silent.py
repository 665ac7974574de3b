"""A peer that hangs: accepts every TCP connection and never reads or writes a byte (an SMTP
server that never greets, a webhook receiver that never answers). No project imports, so the
benchmark (``bench/alerts_hang.py``) uses it as the tests do."""

from __future__ import annotations

import contextlib
import socket
import threading


class SilentServer:
    """Holds every connection it accepts (``held``) until ``close``."""

    def __init__(self, backlog: int = 512) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=backlog)
        self.port = int(self.sock.getsockname()[1])
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                self.held.append(self.sock.accept()[0])

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()
