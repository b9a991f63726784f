"""Tests of nearstep.aio: aligned buffers, O_DIRECT files and the I/O pool."""

from __future__ import annotations

import errno
import os
import shutil
import struct
import tempfile
import threading
import time
import warnings
import zlib

import numpy as np
import pytest
import torch

from nearstep import aio
from nearstep.aio import PAGE, AlignedBuffer, AlignedFile, IOPool, IOResult, align_up, combine_crcs
from nearstep.errors import (
    DiskFullError,
    MisalignedIOError,
    StoreCorruptError,
    StoreIOError,
    StorePermissionError,
)

BLOCK = 64 << 10


def random_buffer(nbytes: int, seed: int = 0) -> AlignedBuffer:
    buf = AlignedBuffer(nbytes)
    buf.numpy()[:] = np.random.default_rng(seed).integers(0, 256, buf.nbytes, dtype=np.uint8)
    return buf


@pytest.fixture
def direct_file(tmp_path):
    with AlignedFile.open(tmp_path / "state.bin", create=True) as file:
        if not file.direct:
            pytest.skip(f"{tmp_path} refuses O_DIRECT, so nothing is checked for alignment")
        yield file


@pytest.fixture
def fresh_warnings(monkeypatch):
    """Forget which file systems were already warned about, so each test sees its own warning."""
    monkeypatch.setattr(aio, "_warned_devices", set())


def test_align_up():
    assert [align_up(n) for n in (0, 1, 4095, 4096, 4097)] == [0, 4096, 4096, 4096, 8192]
    assert align_up(10, 8) == 16


@pytest.mark.parametrize("nbytes", [1, 4095, 4096, 4097, 3 << 20])
def test_buffer_is_page_aligned_and_rounded(nbytes):
    with AlignedBuffer(nbytes) as buf:
        assert buf.address % PAGE == 0
        assert buf.nbytes == align_up(nbytes)
        assert aio.address_of(buf.memoryview()) == buf.address


def test_buffer_views_share_memory():
    with AlignedBuffer(3 * PAGE) as buf:
        floats = buf.tensor(torch.float32)
        assert floats.numel() == 3 * PAGE // 4 and floats.data_ptr() == buf.address
        floats[1] = 2.5
        assert buf.numpy(np.float32)[1] == 2.5
        buf.memoryview(PAGE, 4)[:] = struct.pack("<f", -1.0)
        assert floats[PAGE // 4].item() == -1.0
        tail = buf.tensor(torch.int64, offset=PAGE, numel=2)
        assert tail.data_ptr() == buf.address + PAGE and tail.shape == (2,)
        assert buf.numpy(np.uint8, offset=8, count=4).ctypes.data == buf.address + 8
        with pytest.raises(ValueError):
            buf.memoryview(2 * PAGE, 2 * PAGE)


def test_buffer_close_with_live_views_keeps_views_valid():
    buf = AlignedBuffer(PAGE)
    array, tensor = buf.numpy(), buf.tensor(torch.uint8)
    array[:] = 7
    buf.close()
    buf.close()  # idempotent
    assert int(tensor.sum()) == 7 * PAGE  # the mapping lives on until the views die
    with pytest.raises(ValueError, match="closed"):
        buf.memoryview()
    del array, tensor


def test_buffer_rejects_empty():
    with pytest.raises(ValueError):
        AlignedBuffer(0)


def test_pool_round_trip_with_checksums(tmp_path):
    nbytes = 2 << 20
    source, target = random_buffer(nbytes), AlignedBuffer(nbytes)
    with AlignedFile.open(tmp_path / "state.bin", create=True) as file, IOPool(4, BLOCK) as pool:
        file.allocate(nbytes)
        written = pool.write(file, source, 0, checksum=True).result()
        file.sync()
        read = pool.read(file, target, 0, checksum=True).result()
        counters = pool.counters()

    assert bytes(target.memoryview()) == bytes(source.memoryview())
    # The plain loop is the reference for the per-block CRCs the workers computed.
    data = bytes(source.memoryview())
    expected = tuple(zlib.crc32(data[i:i + BLOCK]) for i in range(0, nbytes, BLOCK))
    assert written == read == IOResult(nbytes, expected)
    assert len(expected) == 32
    assert counters["bytes_written"] == counters["bytes_read"] == nbytes
    assert counters["requests"] == 2
    assert counters["read_seconds"] > 0 and counters["write_seconds"] > 0


def test_pool_at_offset_without_checksum(tmp_path):
    source, target = random_buffer(5 * PAGE, seed=1), AlignedBuffer(5 * PAGE)
    with AlignedFile.open(tmp_path / "state.bin", create=True) as file, IOPool(2, 2 * PAGE) as pool:
        assert pool.write(file, source, 3 * PAGE).result() == IOResult(5 * PAGE, None)
        assert file.size() == 8 * PAGE
        pool.read(file, target, 3 * PAGE).result()
        assert pool.read(file, target.memoryview(0, 0), 0, checksum=True).result() == IOResult(0, ())
    assert bytes(target.memoryview()) == bytes(source.memoryview())


@pytest.mark.parametrize("implementation", ["zlib", "isal"])
def test_crc32_is_zlibs_whichever_library_computes_it(implementation, monkeypatch):
    if implementation == "zlib":
        monkeypatch.setattr(aio, "_fast_crc32", None)
    elif aio.CRC32_IMPLEMENTATION != "isal":
        pytest.skip("the optional isal package is not installed")
    with random_buffer(3 << 20, seed=4) as buf:
        view = buf.memoryview()
        for data in (b"", b"x", view[1:12345], view[PAGE:], view):
            assert aio.crc32(data) == zlib.crc32(data)
            assert aio.crc32(data, 0xDEADBEEF) == zlib.crc32(data, 0xDEADBEEF)
        del data, view


def _vm_flags(address: int) -> set[str]:
    with open("/proc/self/smaps") as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        start, _, end = line.split(" ", 1)[0].partition("-")
        if end and all(c in "0123456789abcdef" for c in start + end) and int(start, 16) <= address < int(end, 16):
            for flags in lines[i + 1:]:
                if flags.startswith("VmFlags:"):
                    return set(flags.split()[1:])
    raise AssertionError(f"no mapping holds {address:#x}")


def test_large_buffers_ask_for_transparent_huge_pages():
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            if "[never]" in f.read():
                pytest.skip("transparent huge pages are off on this machine")
    except OSError:
        pytest.skip("no transparent huge pages on this machine")
    with AlignedBuffer(4 << 20) as large, AlignedBuffer(4 << 20, huge_pages=False) as opted_out, \
            AlignedBuffer(PAGE) as small:
        assert "hg" in _vm_flags(large.address)
        assert "hg" not in _vm_flags(opted_out.address)
        assert "hg" not in _vm_flags(small.address)
        assert large.nbytes == 4 << 20  # the hint changes nothing visible


def test_combine_crcs_by_hand():
    crcs = [0x12345678, 0xDEADBEEF, 0]
    packed = b"\x78\x56\x34\x12" + b"\xef\xbe\xad\xde" + b"\x00\x00\x00\x00"
    assert combine_crcs(crcs) == zlib.crc32(packed)
    assert combine_crcs([]) == zlib.crc32(b"")


def test_pool_keeps_several_blocks_in_flight(tmp_path, monkeypatch):
    in_flight, peak, lock = [0], [0], threading.Lock()
    real_pwritev = os.pwritev

    def slow_pwritev(fd, buffers, offset):
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        time.sleep(0.02)  # stands in for the SSD's latency
        with lock:
            in_flight[0] -= 1
        return real_pwritev(fd, buffers, offset)

    monkeypatch.setattr(aio.os, "pwritev", slow_pwritev)
    with AlignedFile.open(tmp_path / "state.bin", create=True) as file, IOPool(4, PAGE) as pool:
        pool.write(file, random_buffer(8 * PAGE), 0).result()
    assert peak[0] > 1


@pytest.mark.parametrize(
    "what, make_view, offset",
    [
        ("buffer address", lambda buf: buf.memoryview(512, PAGE), 0),
        ("offset", lambda buf: buf.memoryview(0, PAGE), 512),
        ("length", lambda buf: buf.memoryview(0, PAGE + 512), 0),
    ],
)
def test_misaligned_direct_io_is_refused(direct_file, what, make_view, offset):
    with AlignedBuffer(4 * PAGE) as buf, IOPool(2, PAGE) as pool:
        view = make_view(buf)
        for attempt in (
            lambda: direct_file.write_from(view, offset),
            lambda: direct_file.read_into(view, offset),
            lambda: pool.write(direct_file, view, offset),
        ):
            with pytest.raises(MisalignedIOError, match=what) as caught:
                attempt()
            assert "4096" in str(caught.value) and "AlignedBuffer" in str(caught.value)
        del view


def test_buffered_mode_accepts_misaligned_io(tmp_path):
    with AlignedFile.open(tmp_path / "state.bin", create=True, direct=False) as file:
        assert not file.direct
        assert file.write_from(b"hello, store", 3) == 12
        target = bytearray(5)
        assert file.read_into(memoryview(target), 10) == 5
        assert bytes(target) == b"store"


def test_read_past_eof_is_corruption(tmp_path):
    path = tmp_path / "state.bin"
    with AlignedFile.open(path, create=True) as file, AlignedBuffer(4 * PAGE) as buf:
        file.write_from(buf.memoryview(0, 2 * PAGE), 0)
        with pytest.raises(StoreCorruptError, match="shorter than expected") as caught:
            file.read_into(buf, 0)
        assert str(path) in str(caught.value) and "nearstep verify" in str(caught.value)
        with pytest.raises(StoreCorruptError):
            file.read_into(buf.memoryview(0, PAGE), 8 * PAGE)


def test_direct_read_of_unaligned_tail_is_corruption(tmp_path):
    path = tmp_path / "state.bin"
    path.write_bytes(b"x" * 5000)  # a torn write leaves a size that is not a page multiple
    with AlignedFile.open(path) as file, AlignedBuffer(2 * PAGE) as buf:
        with pytest.raises(StoreCorruptError, match="got only 5000"):
            file.read_into(buf, 0)


def _round_trip(file: AlignedFile) -> None:
    source, target = random_buffer(4 * PAGE, seed=2), AlignedBuffer(4 * PAGE)
    with IOPool(2, PAGE) as pool:
        pool.write(file, source, 0).result()
        file.sync()
        pool.read(file, target, 0).result()
    assert bytes(target.memoryview()) == bytes(source.memoryview())


@pytest.fixture
def shm_dir():
    if not os.path.isdir("/dev/shm"):
        pytest.skip("/dev/shm is absent")
    path = tempfile.mkdtemp(prefix="nearstep-test-", dir="/dev/shm")
    yield path
    shutil.rmtree(path)


def test_tmpfs_falls_back_to_buffered_io(shm_dir, fresh_warnings):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = AlignedFile.open(os.path.join(shm_dir, "a.bin"), create=True)
        second = AlignedFile.open(os.path.join(shm_dir, "b.bin"), create=True)
    with first, second:
        if first.direct:
            pytest.skip("this kernel's tmpfs supports O_DIRECT (Linux >= 6.6)")
        assert not second.direct
        assert [w.category for w in caught] == [RuntimeWarning]
        assert "fdatasync" in str(caught[0].message) and shm_dir in str(caught[0].message)
        _round_trip(first)


def test_fallback_when_open_refuses_o_direct(tmp_path, monkeypatch, fresh_warnings):
    real_open = os.open

    def open_without_direct(path, flags, mode=0o777):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, mode)

    monkeypatch.setattr(aio.os, "open", open_without_direct)
    with pytest.warns(RuntimeWarning, match="fdatasync") as caught:
        first = AlignedFile.open(tmp_path / "a.bin", create=True)
        second = AlignedFile.open(tmp_path / "b.bin", create=True)
    assert len(caught) == 1 and str(tmp_path) in str(caught[0].message)
    with first, second:
        assert not first.direct and not second.direct
        _round_trip(first)


def _failing(code: int):
    def syscall(*args):
        raise OSError(code, os.strerror(code))

    return syscall


@pytest.mark.parametrize(
    "code, error, hint",
    [
        (errno.ENOSPC, DiskFullError, "free space"),
        (errno.EDQUOT, DiskFullError, "last committed step is untouched"),
        (errno.EIO, StoreIOError, "dmesg"),
        (errno.EACCES, StorePermissionError, "ownership and mode"),
        (errno.EROFS, StorePermissionError, "ownership and mode"),
    ],
)
@pytest.mark.parametrize("syscall", ["pwritev", "preadv"])
def test_errno_becomes_store_error(tmp_path, monkeypatch, syscall, code, error, hint):
    path = tmp_path / "state.bin"
    with AlignedFile.open(path, create=True) as file, AlignedBuffer(PAGE) as buf:
        file.allocate(2 * PAGE)
        monkeypatch.setattr(aio.os, syscall, _failing(code))
        with pytest.raises(error) as caught:
            (file.write_from if syscall == "pwritev" else file.read_into)(buf, PAGE)
    message = str(caught.value)
    assert caught.value.errno == code and isinstance(caught.value, OSError)
    assert str(path) in message and hint in message and f"offset {PAGE}" in message
    assert ("write" if syscall == "pwritev" else "read") in message


def test_errno_mapping_of_fallocate_and_sync(tmp_path, monkeypatch):
    path = tmp_path / "state.bin"
    with AlignedFile.open(path, create=True) as file:
        monkeypatch.setattr(aio.os, "posix_fallocate", _failing(errno.ENOSPC))
        with pytest.raises(DiskFullError, match="fallocate") as caught:
            file.allocate(1 << 30)
        assert caught.value.errno == errno.ENOSPC and str(path) in str(caught.value)
        monkeypatch.setattr(aio.os, "fdatasync", _failing(errno.EIO))
        with pytest.raises(StoreIOError, match="fdatasync.*dmesg"):
            file.sync()


def test_open_missing_file_names_it(tmp_path):
    path = tmp_path / "missing.bin"
    with pytest.raises(StoreIOError, match="open") as caught:
        AlignedFile.open(path)
    assert caught.value.errno == errno.ENOENT and str(path) in str(caught.value)


def test_wrap_os_error_for_other_store_files(tmp_path):
    path = tmp_path / "manifest.json.tmp"
    wrapped = aio.wrap_os_error(OSError(errno.ENOSPC, "No space left on device"), "commit the manifest", path)
    assert isinstance(wrapped, DiskFullError) and wrapped.errno == errno.ENOSPC and wrapped.filename == str(path)
    assert "commit the manifest" in str(wrapped) and str(path) in str(wrapped)
    other = aio.wrap_os_error(OSError(errno.ENOENT, "No such file or directory"), "open", path)
    assert type(other) is StoreIOError and other.errno == errno.ENOENT


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions, so no EACCES to provoke")
def test_real_permission_error(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        with pytest.raises(StorePermissionError, match="ownership and mode") as caught:
            AlignedFile.open(locked / "state.bin", create=True)
        assert caught.value.errno == errno.EACCES and str(locked) in str(caught.value)
    finally:
        locked.chmod(0o700)


def test_pool_failing_block_fails_request_and_pool_recovers(tmp_path, monkeypatch):
    real_pwritev, in_flight, lock = os.pwritev, [0], threading.Lock()
    bad_offset = 3 * PAGE

    def pwritev_failing_one_block(fd, buffers, offset):
        with lock:
            in_flight[0] += 1
        try:
            time.sleep(0.005)
            if offset == bad_offset:
                raise OSError(errno.EIO, "Input/output error")
            return real_pwritev(fd, buffers, offset)
        finally:
            with lock:
                in_flight[0] -= 1

    path = tmp_path / "state.bin"
    with AlignedFile.open(path, create=True) as file, IOPool(3, PAGE) as pool:
        source = random_buffer(16 * PAGE, seed=3)
        monkeypatch.setattr(aio.os, "pwritev", pwritev_failing_one_block)
        request = pool.write(file, source, 0, checksum=True)
        with pytest.raises(StoreIOError, match=f"offset {bad_offset}") as caught:
            request.result(timeout=10)
        assert caught.value.errno == errno.EIO
        assert in_flight[0] == 0, "a block was still running when the request reported failure"
        assert not request.cancel()

        monkeypatch.setattr(aio.os, "pwritev", real_pwritev)
        _round_trip(file)


def test_pool_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="multiple of 4096"):
        IOPool(2, 1000)
    with pytest.raises(ValueError):
        IOPool(0)
    pool = IOPool(1, PAGE)
    pool.close()
    pool.close()  # idempotent
    with AlignedFile.open(tmp_path / "state.bin", create=True) as file, AlignedBuffer(PAGE) as buf:
        with pytest.raises(RuntimeError, match="closed"):
            pool.read(file, buf, 0)


def test_pool_threads_are_named(tmp_path):
    names = []

    with AlignedFile.open(tmp_path / "state.bin", create=True) as file, IOPool(2, PAGE) as pool:
        real_write_from = file.write_from

        def spy(view, offset):
            names.append(threading.current_thread().name)
            return real_write_from(view, offset)

        file.write_from = spy
        pool.write(file, random_buffer(2 * PAGE), 0).result()
    assert names and all(name.startswith("nearstep-io") for name in names)


def test_file_close_is_idempotent(tmp_path):
    file = AlignedFile.open(tmp_path / "state.bin", create=True)
    file.close()
    file.close()
    with pytest.raises(ValueError, match="closed"):
        file.size()
