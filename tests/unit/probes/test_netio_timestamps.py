"""Timestamps taken where the event happens, not when a task resumes (probes/netio.py)."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from edgeprobe.probes import netio


async def test_connect_is_stamped_in_the_writability_callback() -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    sock = socket.socket()
    sock.setblocking(False)
    try:
        before = time.perf_counter_ns()
        done_ns = await netio._timed_connect(asyncio.get_running_loop(), sock, server.getsockname())
        after = time.perf_counter_ns()
        assert before <= done_ns <= after
        assert sock.getpeername() == server.getsockname()
    finally:
        sock.close()
        server.close()


async def test_refused_connect_raises_the_os_error() -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    sock = socket.socket()
    sock.setblocking(False)
    try:
        with pytest.raises(ConnectionRefusedError):
            await netio._timed_connect(asyncio.get_running_loop(), sock, ("127.0.0.1", port))
    finally:
        sock.close()


async def test_reads_carry_the_time_the_bytes_arrived() -> None:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    reader, writer = await netio._open_stream(ours)
    conn = netio.Conn(reader, writer, address="local", port=0)
    try:
        theirs.sendall(b"first")
        await asyncio.sleep(0.05)  # the loop has fed the bytes in long before we read them
        data, stamp = await conn.read_some(1.0, during="reading")
        assert data == b"first"
        assert time.perf_counter_ns() - stamp >= 40_000_000
        theirs.sendall(b"second")
        data, stamp2 = await conn.read_some(1.0, during="reading")
        assert data == b"second" and stamp2 > stamp
    finally:
        await conn.aclose()
        theirs.close()
