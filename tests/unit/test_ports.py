"""Free ports on 127.0.0.1, for the local Ray cluster a job starts and for every server the tests start."""

from __future__ import annotations

import socket

from simpsons.cluster import free_ports


def test_ports_picked_together_are_different_and_free():
    # Picked one by one, a port just seen closed can come back: a Ray head then got the same port for
    # its dashboard and its dashboard agent and refused to start.
    ports = free_ports(64)
    assert len(set(ports)) == 64
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
