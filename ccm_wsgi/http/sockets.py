"""The listen fields of a ccm service that act on sockets: `reuse_addr` and TCP keep-alive.

TCP keep-alive matters for a proxy of long streams: a client that vanished (a laptop closed, a NAT entry
dropped) during a quiet stretch of a stream is otherwise only noticed at the next write. As in sing-box
it is on by default (first probe after `tcp_keep_alive`, 5 minutes, then every `tcp_keep_alive_interval`,
75 s) and `disable_tcp_keep_alive` turns it off. `reuse_addr` lets another process listen on the same
port (SO_REUSEPORT), for a restart without a gap.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import Service as ServiceConfig

@dataclass(frozen=True, slots=True)
class KeepAlive:
    enabled: bool
    idle: float
    interval: float
    reuse_port: bool

    @classmethod
    def of(cls, cfg: ServiceConfig) -> KeepAlive:
        return cls(not cfg.disable_tcp_keep_alive, cfg.tcp_keep_alive, cfg.tcp_keep_alive_interval, cfg.reuse_addr)

    def apply(self, sock: socket.socket) -> None:
        """Set keep-alive on an accepted connection."""
        if not self.enabled:
            return
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):  # Linux; macOS has only the system-wide defaults
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, max(1, round(self.idle)))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, round(self.interval)))
