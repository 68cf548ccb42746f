"""The gate the tracking outage test shuts: a shut gate must refuse new connections and cut open ones
(a gate that lets one connection through keeps an HTTP client's keep-alive session working, and the
outage never happens)."""

from __future__ import annotations

import socket
import threading

import pytest
from tcp_gate import TcpGate


@pytest.fixture
def echo_port():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=echo_back, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    yield server.getsockname()[1]
    server.shutdown(socket.SHUT_RDWR)
    server.close()


def echo_back(conn: socket.socket) -> None:
    while data := conn.recv(1024):
        conn.sendall(data)


def echo(port: int, data: bytes, sock: socket.socket | None = None) -> bytes:
    sock = sock or socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(data)
    return sock.recv(1024)


def test_a_shut_gate_refuses_new_connections_and_cuts_open_ones_until_opened(echo_port):
    with TcpGate(echo_port) as gate:
        kept = socket.create_connection(("127.0.0.1", gate.port), timeout=5)
        assert echo(gate.port, b"ping", kept) == b"ping"
        gate.shut()
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", gate.port), timeout=5)
        assert kept.recv(1024) == b"", "the open connection was cut"
        gate.open()
        assert echo(gate.port, b"again") == b"again"
