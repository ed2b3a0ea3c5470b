"""The WebSocket tunnel: frames pass through untouched, flow control, limits both ways, and the
frame tracker that makes those possible without decoding payloads."""

from __future__ import annotations

import asyncio
import base64
import gc
import os
import struct

import aiohttp
import pytest
from aiohttp import WSMsgType
from hypothesis import given, settings
from hypothesis import strategies as st

from stickylb.wire.ws_frames import (
    MESSAGE_TOO_BIG,
    OK,
    PROTOCOL_ERROR,
    FrameTracker,
    close_frame,
)

from .support import backends, balancer, cyclic_garbage, one_backend, spawn_balancer

BLOCK = 64 * 1024


def frame(payload: bytes, *, opcode: int = 2, final: bool = True, masked: bool = True) -> bytes:
    first = (0x80 if final else 0) | opcode
    size = len(payload)
    if size < 126:
        head = struct.pack("!BB", first, (0x80 if masked else 0) | size)
    elif size < 65536:
        head = struct.pack("!BBH", first, (0x80 if masked else 0) | 126, size)
    else:
        head = struct.pack("!BBQ", first, (0x80 if masked else 0) | 127, size)
    if not masked:
        return head + payload
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


@settings(max_examples=200, deadline=None)
@given(
    messages=st.lists(
        st.tuples(
            st.lists(st.integers(0, 300) | st.just(70_000), min_size=1, max_size=4),
            st.booleans(),
        ),
        min_size=1,
        max_size=6,
    ),
    masked=st.booleans(),
    cuts=st.lists(st.integers(1, 50), max_size=40),
    limit=st.integers(0, 900),
)
def test_frame_tracker_follows_any_split_of_any_frames(messages, masked, cuts, limit):
    stream = b""
    ends = {0}  # where a frame ends: the only places the tracker may say it is between frames
    over = False
    for fragments, with_ping in messages:
        total = 0
        for i, size in enumerate(fragments):
            opcode = 1 if i == 0 else 0
            final = i == len(fragments) - 1
            stream += frame(b"x" * size, opcode=opcode, final=final, masked=masked)
            ends.add(len(stream))
            total += size
            over = over or total > limit
            if with_ping:  # control frames may sit between fragments and never count
                stream += frame(b"p" * 5, opcode=9, masked=masked)
                ends.add(len(stream))
    tracker = FrameTracker(limit, masked=masked)
    flagged = False
    pos = 0
    for cut in [*cuts, len(stream)]:
        chunk, pos = stream[pos : pos + cut], min(pos + cut, len(stream))
        if chunk:
            verdict = tracker.feed(chunk)
            assert verdict in (OK, MESSAGE_TOO_BIG)
            if verdict == MESSAGE_TOO_BIG:
                flagged = True
                break
        assert tracker.at_boundary == (pos in ends), pos
    assert flagged == over
    if not over:
        assert tracker.at_boundary


BAD_FRAMES = [
    ("ping over 125 bytes", frame(b"p" * 126, opcode=9), True),
    ("ping declaring 2**62 bytes", b"\x89\xff" + struct.pack("!Q", 2**62), True),
    ("fragmented close", frame(b"\x03\xe8", opcode=8, final=False), True),
    ("reserved data opcode", frame(b"x", opcode=3), True),
    ("reserved control opcode", frame(b"x", opcode=0xB), True),
    ("client frame without a mask", frame(b"x", masked=False), True),
    ("server frame with a mask", frame(b"x", masked=True), False),
]


@pytest.mark.parametrize(
    ("name", "data", "masked"),
    # Named by their description: the masks are random, so the bytes make no stable id.
    [pytest.param(*case, id=case[0]) for case in BAD_FRAMES],
)
def test_frames_no_endpoint_may_send_are_protocol_errors(name, data, masked):
    tracker = FrameTracker(1 << 20, masked=masked)
    assert tracker.feed(frame(b"fine", masked=masked)) == OK
    assert tracker.feed(data) == PROTOCOL_ERROR, name


def test_close_frames_for_each_side():
    assert close_frame(1009, "too big", masked=False) == b"\x88\x09\x03\xf1too big"
    masked = close_frame(1001, "bye", masked=True)
    assert masked[:2] == b"\x88\x85"
    mask, body = masked[2:6], masked[6:]
    assert bytes(b ^ mask[i % 4] for i, b in enumerate(body)) == b"\x03\xe9bye"


async def raw_upgrade(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    key = base64.b64encode(os.urandom(16))
    writer.write(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + key + b"\r\n\r\n"
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    return reader, writer, head


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    first, second = await reader.readexactly(2)
    size = second & 0x7F
    if size == 126:
        size = struct.unpack("!H", await reader.readexactly(2))[0]
    elif size == 127:
        size = struct.unpack("!Q", await reader.readexactly(8))[0]
    return first & 0x0F, await reader.readexactly(size)


async def test_fragments_pass_through_and_the_handshake_is_the_backends():
    async with backends("a") as servers, balancer(one_backend(servers[0])) as lb:
        reader, writer, head = await raw_upgrade(lb.url)
        try:
            assert head.startswith(b"HTTP/1.1 101")
            assert b"Sec-WebSocket-Accept: " in head and b"X-Backend-ID=" in head
            assert await asyncio.wait_for(read_frame(reader), 5) == (1, b"hello from a")
            writer.write(frame(b"hel", opcode=1, final=False) + frame(b"lo", opcode=0))
            assert await asyncio.wait_for(read_frame(reader), 5) == (1, b"a:hello")
        finally:
            writer.close()


async def test_compression_is_negotiated_end_to_end():
    async with backends("a") as servers, balancer(one_backend(servers[0])) as lb:
        async with aiohttp.ClientSession() as client:
            async with client.ws_connect(lb.url + "/ws", compress=15) as ws:
                assert ws.compress == 15  # the backend's answer reached the client
                assert await ws.receive_str() == "hello from a"
                await ws.send_str("squeeze " * 1000)
                assert await ws.receive_str() == "a:" + "squeeze " * 1000


async def test_oversize_message_from_the_backend_closes_both_with_1009():
    async with backends("a") as servers:
        config = one_backend(servers[0], websocket={"maxMessageSize": "1KiB"})
        async with balancer(config) as lb, aiohttp.ClientSession() as client:
            async with client.ws_connect(lb.url + "/ws") as ws:
                assert await ws.receive_str() == "hello from a"
                await ws.send_str("flood:1")
                msg = await asyncio.wait_for(ws.receive(), 5)
                assert msg.type is WSMsgType.CLOSE
                assert msg.data == 1009
        await asyncio.sleep(0.2)
        assert servers[0].knobs.ws_close_code == 1009


async def test_a_websocket_reader_that_stalls_is_flow_controlled(tmp_path):
    count = 1600  # 100 MiB
    async with backends("a") as servers:
        proc = spawn_balancer(one_backend(servers[0]), tmp_path)
        try:
            async with aiohttp.ClientSession() as client:
                async with client.ws_connect(proc.url + "/ws", max_msg_size=0) as ws:
                    assert await ws.receive_str() == "hello from a"
                    baseline = proc.rss_kib("VmRSS")
                    await ws.send_str(f"flood:{count}")
                    await asyncio.sleep(1.5)  # the backend could have sent it all by now
                    grown = proc.rss_kib("VmRSS") - baseline
                    received = 0
                    for _ in range(count):  # and everything still arrives once we read
                        msg = await asyncio.wait_for(ws.receive(), 10)
                        assert msg.type is WSMsgType.BINARY and len(msg.data) == BLOCK
                        received += 1
            assert received == count
            assert grown < 30 * 1024, grown
        finally:
            assert proc.stop() == 0


async def test_a_backend_that_stops_reading_holds_the_client_back(tmp_path):
    count = 1600  # 100 MiB
    block = os.urandom(BLOCK)
    async with backends("a") as servers:
        proc = spawn_balancer(one_backend(servers[0]), tmp_path)
        try:
            async with aiohttp.ClientSession() as client:
                async with client.ws_connect(proc.url + "/ws") as ws:
                    assert await ws.receive_str() == "hello from a"
                    baseline = proc.rss_kib("VmRSS")
                    await ws.send_str("nap:2")

                    async def send_all() -> None:
                        for _ in range(count):
                            await ws.send_bytes(block)
                        await ws.send_str("count?")

                    sender = asyncio.create_task(send_all())
                    await asyncio.sleep(1.5)  # the client could have sent it all by now
                    grown = proc.rss_kib("VmRSS") - baseline
                    assert not sender.done()  # held back by the proxy, not buffered for
                    await asyncio.wait_for(sender, 30)
                    assert await asyncio.wait_for(ws.receive_str(), 30) == f"got:{count}"
            assert grown < 30 * 1024, grown
        finally:
            assert proc.stop() == 0


async def test_a_closed_websocket_is_freed_at_once():
    # Tunnels live long, so a cycle would hold both connections until a full GC pass.
    async with backends("a") as servers, balancer(one_backend(servers[0])) as lb:
        gc.collect()
        gc.disable()
        try:
            async with aiohttp.ClientSession() as client:
                for closed_by_backend in (False, True):
                    async with client.ws_connect(lb.url + "/ws") as ws:
                        assert await ws.receive_str() == "hello from a"
                        if closed_by_backend:
                            await ws.send_str("close:4000:bye")
                            assert (await ws.receive()).type is WSMsgType.CLOSE
            await asyncio.sleep(0.3)  # both connections are lost by now
            garbage = cyclic_garbage()
            kinds = ("Tunnel", "TunnelEnd", "ClientConnection", "BackendConnection", "RequestCycle")
            assert {kind: garbage[kind] for kind in kinds} == dict.fromkeys(kinds, 0)
        finally:
            gc.enable()
