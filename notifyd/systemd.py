"""sd_notify over `$NOTIFY_SOCKET`, without libsystemd.

The protocol is one datagram per state change to a unix socket (an abstract one when the path
starts with `@`). Absent `NOTIFY_SOCKET` every call is a no-op, so the same code runs under
systemd, in a container and in tests.
"""

from __future__ import annotations

import os
import socket


class SystemdNotifier:
    def __init__(self, address: str | None = None) -> None:
        raw = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        self._address = "\0" + raw[1:] if raw.startswith("@") else raw
        self._socket: socket.socket | None = None
        if self._address:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            # never wait on the event loop: a receiver that does not read (systemd stuck,
            # a test) fills its queue, and a blocking send would then freeze every request
            # and actor of the daemon; a notify that cannot go now is dropped (False)
            self._socket.setblocking(False)

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def notify(self, state: str) -> bool:
        """Send `state` (e.g. "READY=1"); False when there is no socket or the send failed.

        A failed notify must never take the daemon down: systemd will notice on its own.
        """
        if self._socket is None:
            return False
        try:
            self._socket.sendto(state.encode(), self._address)
        except OSError:
            return False
        return True

    def watchdog_interval(self) -> float | None:
        """Half the watchdog period systemd asked for (`WATCHDOG_USEC`), or None."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not usec or (pid and pid != str(os.getpid())):
            return None
        try:
            return int(usec) / 2_000_000
        except ValueError:
            return None

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
