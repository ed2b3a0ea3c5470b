"""Bodies stream through a real proxy process with bounded memory."""

from __future__ import annotations

import asyncio
import hashlib

import aiohttp

from .support import backends, one_backend, spawn_balancer

SIZE = 100 * 1024 * 1024
MAX_GROWTH_KIB = 30 * 1024  # the whole 100 MiB would be 102400 KiB


async def body(size: int, digest: hashlib._Hash):
    block = bytes(range(256)) * 256  # 64 KiB
    sent = 0
    while sent < size:
        part = block[: min(len(block), size - sent)]
        digest.update(part)
        sent += len(part)
        yield part


async def test_100_mib_upload_and_download_with_bounded_proxy_memory(tmp_path):
    async with backends("a") as servers:
        proc = spawn_balancer(one_backend(servers[0]), tmp_path)
        try:
            async with aiohttp.ClientSession() as client:
                async with client.get(proc.url + "/") as resp:  # warm up
                    assert resp.status == 200
                baseline = proc.rss_kib("VmRSS")

                sent_digest = hashlib.sha256()
                async with client.post(proc.url + "/upload", data=body(SIZE, sent_digest)) as r:
                    result = await r.json()
                assert result["size"] == SIZE
                assert result["sha"] == sent_digest.hexdigest()

                sent_digest = hashlib.sha256()
                headers = {"Content-Length": str(SIZE)}
                async with client.put(
                    proc.url + "/upload", data=body(SIZE, sent_digest), headers=headers
                ) as r:
                    result = await r.json()
                assert result["size"] == SIZE and result["cl"] == str(SIZE)
                assert result["te"] is None  # a length-delimited body stays length-delimited

                for length in ("0", "1"):
                    received = 0
                    url = f"{proc.url}/download?size={SIZE}&length={length}"
                    async with client.get(url) as r:
                        assert r.status == 200
                        async for chunk in r.content.iter_chunked(1 << 16):
                            received += len(chunk)
                    assert received == SIZE
            peak = proc.rss_kib("VmHWM")
            print(f"proxy RSS baseline {baseline} KiB, peak {peak} KiB")
            assert peak - baseline < MAX_GROWTH_KIB, (baseline, peak)
        finally:
            assert proc.stop() == 0


async def test_slow_reader_does_not_make_the_proxy_buffer(tmp_path):
    async with backends("a") as servers:
        proc = spawn_balancer(one_backend(servers[0]), tmp_path)
        try:
            async with aiohttp.ClientSession() as client:
                async with client.get(proc.url + "/") as resp:
                    assert resp.status == 200
                baseline = proc.rss_kib("VmRSS")
                async with client.get(f"{proc.url}/download?size={SIZE}") as r:
                    await r.content.read(1 << 20)
                    await asyncio.sleep(1.5)  # the backend could have sent it all by now
                    grown = proc.rss_kib("VmRSS") - baseline
                    r.close()
            assert grown < MAX_GROWTH_KIB, grown
        finally:
            assert proc.stop() == 0
