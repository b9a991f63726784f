"""Tests of nearstep.uring (the io_uring backend) and of choosing a backend with uring.open_io.

Every check of the ring is made against a slow reference: zlib.crc32 over each
block in a plain loop, bytes written and read back with plain os.pread/os.pwrite,
or the thread pool on the same files.
"""

from __future__ import annotations

import os
import threading
import zlib

import numpy as np
import pytest
import torch

import nearstep
from nearstep import uring
from nearstep.aio import PAGE, AlignedBuffer, AlignedFile, IOPool, IOResult
from nearstep.device import DeviceConfig
from nearstep.errors import MisalignedIOError, StoreCorruptError, StoreIOError

RING, WHY = uring.ring_support()
needs_ring = pytest.mark.skipif(not RING, reason=f"no io_uring here: {WHY}")


def random_buffer(nbytes: int, rng: np.random.Generator) -> AlignedBuffer:
    buf = AlignedBuffer(nbytes)
    buf.numpy()[:] = rng.integers(0, 256, buf.nbytes, dtype=np.uint8)
    return buf


def block_crcs(data: bytes, block: int) -> tuple[int, ...]:
    return tuple(zlib.crc32(data[i:i + block]) for i in range(0, len(data), block))


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@needs_ring
@pytest.mark.parametrize("seed", range(4))
def test_ring_round_trip_matches_plain_io_and_zlib(tmp_path, seed):
    rng = np.random.default_rng(seed)
    block = int(rng.integers(1, 9)) * PAGE
    nbytes = int(rng.integers(1, 200)) * PAGE
    offset = int(rng.integers(0, 16)) * PAGE
    depth = int(rng.integers(1, 9))
    source, target = random_buffer(nbytes, rng), AlignedBuffer(nbytes)
    path = tmp_path / "state.bin"
    with AlignedFile.open(path, create=True) as file, uring.IORing(depth, block) as ring:
        written = ring.write(file, source, offset, checksum=True).result()
        file.sync()
        read = ring.read(file, target, offset, checksum=True).result()
        counters = ring.counters()
    data = bytes(source.memoryview())
    # The references: plain reads of the file, and zlib over each block in a loop.
    with open(path, "rb") as f:
        f.seek(offset)
        assert f.read(nbytes) == data
    assert bytes(target.memoryview()) == data
    assert written == read == IOResult(nbytes, block_crcs(data, block))
    assert counters["bytes_written"] == counters["bytes_read"] == nbytes and counters["requests"] == 2


@needs_ring
def test_ring_and_pool_agree_on_each_others_files(tmp_path):
    rng = np.random.default_rng(7)
    nbytes, block = 3 << 20, 256 << 10
    a, b = random_buffer(nbytes, rng), random_buffer(nbytes, rng)
    back_a, back_b = AlignedBuffer(nbytes), AlignedBuffer(nbytes)
    with AlignedFile.open(tmp_path / "a", create=True) as fa, AlignedFile.open(tmp_path / "b", create=True) as fb, \
            uring.IORing(4, block) as ring, IOPool(3, block) as pool:
        wa = ring.write(fa, a, 0, checksum=True).result()
        wb = pool.write(fb, b, 0, checksum=True).result()
        assert pool.read(fa, back_a, 0, checksum=True).result() == wa
        assert ring.read(fb, back_b, 0, checksum=True).result() == wb
    assert bytes(back_a.memoryview()) == bytes(a.memoryview())
    assert bytes(back_b.memoryview()) == bytes(b.memoryview())


@needs_ring
def test_ring_without_checksum_at_an_offset_and_empty_requests(tmp_path):
    rng = np.random.default_rng(1)
    source, target = random_buffer(5 * PAGE, rng), AlignedBuffer(5 * PAGE)
    with AlignedFile.open(tmp_path / "state.bin", create=True) as file, uring.IORing(2, 2 * PAGE) as ring:
        assert ring.write(file, source, 3 * PAGE).result() == IOResult(5 * PAGE, None)
        assert file.size() == 8 * PAGE
        assert ring.read(file, target, 3 * PAGE).result() == IOResult(5 * PAGE, None)
        assert ring.read(file, target.memoryview(0, 0), 0, checksum=True).result() == IOResult(0, ())
    assert bytes(target.memoryview()) == bytes(source.memoryview())


@needs_ring
def test_ring_keeps_its_depth_in_flight_and_never_more(tmp_path, monkeypatch):
    submitted, peak = [], [0]
    real_submit, real_push = uring.IORing.submit_entries, uring.IORing.push_entry

    def counting_submit(self, count):
        submitted.append(count)
        return real_submit(self, count)

    def watching_push(self, *args):
        peak[0] = max(peak[0], self.in_flight + 1)
        return real_push(self, *args)

    monkeypatch.setattr(uring.IORing, "submit_entries", counting_submit)
    monkeypatch.setattr(uring.IORing, "push_entry", watching_push)
    rng = np.random.default_rng(2)
    with AlignedFile.open(tmp_path / "state.bin", create=True) as file, uring.IORing(6, PAGE) as ring, \
            random_buffer(40 * PAGE, rng) as source:
        ring.write(file, source, 0).result()
    assert submitted[0] == 6  # the caller filled the ring to its depth at once
    assert sum(submitted) == 40 + 1  # every block once, and the no-op that woke the reaper at close
    assert peak[0] == 6


@needs_ring
def test_short_transfers_are_resumed(tmp_path, monkeypatch):
    # Ask the kernel for half of each block the first time: it moves exactly that, and the
    # ring must resume from there (as it must when a device returns short).
    real_push, halved = uring.IORing.push_entry, set()

    def short_push(self, op, fd, offset, address, length, user_data):
        if op != uring._OP_NOP and length == block and (op, offset) not in halved:  # a block's first try
            halved.add((op, offset))
            length = length // 2 // PAGE * PAGE
        return real_push(self, op, fd, offset, address, length, user_data)

    monkeypatch.setattr(uring.IORing, "push_entry", short_push)
    rng = np.random.default_rng(3)
    nbytes, block = 24 * PAGE, 8 * PAGE
    source, target = random_buffer(nbytes, rng), AlignedBuffer(nbytes)
    with AlignedFile.open(tmp_path / "state.bin", create=True) as file, uring.IORing(2, block) as ring:
        written = ring.write(file, source, 0, checksum=True).result()
        read = ring.read(file, target, 0, checksum=True).result()
    data = bytes(source.memoryview())
    assert bytes(target.memoryview()) == data
    assert written == read == IOResult(nbytes, block_crcs(data, block))
    assert len(halved) == 6  # three blocks, each cut once on the way out and once on the way in


@needs_ring
def test_reading_past_the_end_is_corruption(tmp_path):
    path = tmp_path / "state.bin"
    with AlignedFile.open(path, create=True) as file, AlignedBuffer(4 * PAGE) as buf, uring.IORing(4, PAGE) as ring:
        file.write_from(buf.memoryview(0, 2 * PAGE), 0)
        with pytest.raises(StoreCorruptError, match="shorter than expected") as caught:
            ring.read(file, buf, 0).result()
        assert str(path) in str(caught.value) and "nearstep verify" in str(caught.value)


@needs_ring
def test_a_direct_read_of_a_torn_tail_is_corruption(tmp_path):
    path = tmp_path / "state.bin"
    path.write_bytes(b"x" * 5000)  # a torn write leaves a size that is not a page multiple
    with AlignedFile.open(path) as file, AlignedBuffer(2 * PAGE) as buf, uring.IORing(2, 2 * PAGE) as ring:
        with pytest.raises(StoreCorruptError, match="got only 5000"):
            ring.read(file, buf, 0).result()


@needs_ring
def test_a_failed_block_fails_the_request_and_the_rest_never_run(tmp_path):
    path = tmp_path / "state.bin"
    path.write_bytes(b"\0" * 8 * PAGE)
    rng = np.random.default_rng(4)
    with AlignedFile.open(path, writable=False) as file, random_buffer(8 * PAGE, rng) as source, \
            uring.IORing(1, PAGE) as ring:
        with pytest.raises(StoreIOError) as caught:
            ring.write(file, source, 0, checksum=True).result()
        message = str(caught.value)
        assert str(path) in message and "write at offset 0" in message and caught.value.errno == 9  # EBADF
        assert ring.counters()["bytes_written"] == 0
        # The ring is still usable afterwards.
        target = AlignedBuffer(8 * PAGE)
        assert ring.read(file, target, 0).result().nbytes == 8 * PAGE
    assert path.read_bytes() == b"\0" * 8 * PAGE


@needs_ring
def test_misaligned_direct_io_is_refused_before_the_kernel(tmp_path):
    with AlignedFile.open(tmp_path / "state.bin", create=True) as file, AlignedBuffer(4 * PAGE) as buf, \
            uring.IORing(2, PAGE) as ring:
        if not file.direct:
            pytest.skip("no O_DIRECT here, so nothing is checked for alignment")
        with pytest.raises(MisalignedIOError, match="buffer address"):
            ring.write(file, buf.memoryview(512, PAGE), 0)
        with pytest.raises(MisalignedIOError, match="offset"):
            ring.read(file, buf.memoryview(0, PAGE), 512)
        assert ring.counters()["requests"] == 0


@needs_ring
def test_close_waits_for_work_in_flight_and_frees_the_ring(tmp_path):
    rng = np.random.default_rng(5)
    before = open_fds()
    ring = uring.IORing(4, PAGE)
    assert open_fds() > before  # the ring's fd, and the duplicates Python's mmap keeps
    with AlignedFile.open(tmp_path / "state.bin", create=True) as file, random_buffer(64 * PAGE, rng) as source:
        future = ring.write(file, source, 0, checksum=True)
        ring.close()
        assert future.done() and future.result().nbytes == 64 * PAGE
        with pytest.raises(RuntimeError, match="closed"):
            ring.read(file, source, 0)
    ring.close()  # twice is fine
    assert open_fds() == before


@needs_ring
def test_many_threads_share_one_ring(tmp_path):
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            rng = np.random.default_rng(100 + i)
            nbytes = int(rng.integers(1, 64)) * PAGE
            with AlignedFile.open(tmp_path / f"f{i}", create=True) as file, random_buffer(nbytes, rng) as source, \
                    AlignedBuffer(nbytes) as target:
                for _ in range(5):
                    w = ring.write(file, source, 0, checksum=True).result()
                    r = ring.read(file, target, 0, checksum=True).result()
                    assert w == r == IOResult(nbytes, block_crcs(bytes(source.memoryview()), 2 * PAGE))
                    assert bytes(target.memoryview()) == bytes(source.memoryview())
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    with uring.IORing(3, 2 * PAGE) as ring:
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors


def test_open_io_picks_the_backend(monkeypatch):
    with uring.open_io("threads", threads=2) as pool:
        assert isinstance(pool, IOPool)
    with uring.open_io("auto") as auto:
        assert isinstance(auto, uring.IORing if RING else IOPool)
    with pytest.raises(ValueError, match="'auto', 'ring', 'threads'"):
        uring.open_io("libaio")
    # Where the kernel or a sandbox refuses io_uring: "auto" falls back, "ring" says why.
    monkeypatch.setattr(uring, "ring_support", lambda: (False, "refused by a seccomp profile (test)"))
    with uring.open_io("auto", threads=3) as fallback:
        assert isinstance(fallback, IOPool)
    with pytest.raises(OSError, match="seccomp profile.*io_backend='auto' or 'threads'"):
        uring.open_io("ring")


def test_device_config_checks_the_io_settings():
    with pytest.raises(ValueError, match="io_backend"):
        DeviceConfig(io_backend="aio")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="queue_depth"):
        DeviceConfig(queue_depth=0)
    assert DeviceConfig().engine_config().io_backend == "auto"


@pytest.mark.parametrize("backend", ["inline", "emulated"])
def test_training_is_the_same_on_either_io_backend(tmp_path, backend):
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 8))
              for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    data = [(torch.randn(16, 64), torch.randn(16, 8)) for _ in range(5)]
    infos = []
    for model, io in zip(models, ["threads", "ring" if RING else "auto"]):
        device = DeviceConfig(backend=backend, io_backend=io, memory_budget="64MiB")
        with nearstep.AdamW(model.parameters(), lr=1e-2, store=tmp_path / io, device=device, slice_mb=0.05) as opt:
            for x, y in data:
                torch.nn.functional.mse_loss(model(x), y).backward()
                opt.step()
                opt.zero_grad()
            infos.append(opt.device.info.io_backend)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)
    assert infos[0] == "thread pool of 4"
    assert infos[1].startswith("io_uring, queue depth 32" if RING else "thread pool")
