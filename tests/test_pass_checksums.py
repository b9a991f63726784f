"""Checksums computed in the kernel's pass over an fp32 slice (engine [Note: checksums in the kernel's pass]).

The slow references: zlib.crc32 over each block of the image in a plain loop,
the engine with the whole slice as one chunk, torch.optim.AdamW, and
``Store.verify`` reading every committed file back.
"""

from __future__ import annotations

import contextlib
import os
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import nearstep
from nearstep import engine, store as store_module
from nearstep.formats import native
from nearstep.aio import PAGE

CHECKSUM_BLOCK = 2 * PAGE  # many blocks per slice, several straddling region boundaries


def zlib_blocks(image: bytes, block: int) -> list[int]:
    return [zlib.crc32(image[i:i + block]) for i in range(0, len(image), block)]


@pytest.mark.parametrize("seed", range(6))
def test_pass_crcs_match_zlib_for_any_layout_and_chunking(seed):
    rng = np.random.default_rng(seed)
    regions, extent = int(rng.integers(1, 4)), int(rng.integers(1, 5000))
    region = -(-extent * 4 // PAGE) * PAGE
    nbytes = regions * region
    block = int(rng.integers(1, 4)) * PAGE
    chunk = int(rng.integers(1, 700))
    image = bytearray(rng.integers(0, 256, nbytes, dtype=np.uint8).tobytes())
    spans = [(r * region, r * region + 4 * extent) for r in range(regions)]
    crcs = engine._PassCrcs(block, nbytes, spans)
    view = memoryview(image)
    crcs.edges(view)
    for a in range(0, extent, chunk):  # the engine's order: every region's piece of chunk 1, then of chunk 2...
        b = min(a + chunk, extent)
        for lo, _hi in spans:
            crcs.feed(view, lo + 4 * a, lo + 4 * b)
    assert crcs.result() == zlib_blocks(bytes(image), block)
    assert engine._PassCrcs(block, nbytes, []).edge_blocks == list(range(-(-nbytes // block)))


@pytest.mark.parametrize("seed", range(8))
def test_threaded_pass_checksums_the_images_before_and_after_and_updates_each_element_once(seed, monkeypatch):
    """[Note: a pass on several cores]: random layouts, blocks and thread counts; every element is
    updated exactly once and the CRCs are zlib's over the images before and after, including the
    blocks a thread's cut splits."""
    rng = np.random.default_rng(100 + seed)
    monkeypatch.setattr(engine, "SPLIT", int(rng.choice([64, 128, 256])))
    sizes = rng.integers(1, 3000, int(rng.integers(1, 6)))
    bounds, at = [], 0
    for size in sizes:  # segments with gaps between them, as a slice's padding
        bounds.append((at, at + int(size)))
        at += int(size) + int(rng.integers(0, 300))
    extent = at
    regions = int(rng.integers(1, 4))
    region = -(-extent * 4 // PAGE) * PAGE
    image = np.frombuffer(bytearray(rng.integers(0, 256, regions * region, dtype=np.uint8).tobytes()), np.uint8)
    floats = [image[r * region: r * region + 4 * extent].view(np.float32) for r in range(regions)]
    segments = sorted(rng.choice(len(bounds), int(rng.integers(1, len(bounds) + 1)), replace=False).tolist())
    before = bytes(image)
    touched = np.zeros(extent, np.int64)

    def update(pieces, at, worker):
        for _j, lo, hi in pieces:
            touched[lo:hi] += 1
            for f in floats:
                f.view(np.uint32)[lo:hi] ^= 0x5A5A5A5A
    threads = engine.PassThreads(int(rng.integers(2, 5)))
    try:
        block = int(rng.integers(1, 4)) * PAGE
        spans = [(r * region, r * region + 4 * extent, 4, 1) for r in range(regions)]
        got_before, got_after = engine.checked_pass(memoryview(image), block, spans, extent, segments, bounds,
                                                    int(rng.integers(64, 2000)), update, threads=threads)
    finally:
        threads.close()
    assert got_before == zlib_blocks(before, block)
    assert got_after == zlib_blocks(bytes(image), block)
    expected = np.zeros(extent, np.int64)
    for j in segments:
        expected[bounds[j][0]:bounds[j][1]] = 1
    assert np.array_equal(touched, expected)


def test_a_block_fed_out_of_order_is_a_bug_not_a_checksum(tmp_path):
    crcs = engine._PassCrcs(PAGE, 4 * PAGE, [(0, 4 * PAGE)])
    view = memoryview(bytearray(4 * PAGE))
    with pytest.raises(AssertionError, match="fed at"):
        crcs.feed(view, 100, 200)
    with pytest.raises(AssertionError, match="fed only up to"):
        crcs.result()


class Wide(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(96, 120)
        self.b = nn.Linear(120, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


@pytest.fixture
def small_blocks(monkeypatch):
    create = store_module.Store.create.__func__
    monkeypatch.setattr(store_module.Store, "create",
                        classmethod(lambda cls, *a, **k: create(cls, *a, **{**k, "checksum_block": CHECKSUM_BLOCK})))


def train(path: Path, chunk: int, monkeypatch, steps: int = 6, **options) -> tuple[nn.Module, dict]:
    monkeypatch.setattr(engine, "PASS_CHUNK", chunk)
    torch.manual_seed(0)
    model = Wide()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 96, generator=g), torch.randn(16, 7, generator=g)) for _ in range(steps)]
    options = {"device": "inline", **options}
    with nearstep.AdamW(model.parameters(), lr=1e-2, store=path, slice_mb=0.03, **options) as opt:
        for x, y in data:
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        stats = opt.stats()
    return model, stats


@pytest.mark.parametrize("fmt", ["bf16-sr+8bit-b32", "bf16-kahan+8bit-linear-b64", "bf16-sr", "8bit-b32"])
def test_compressed_pass_decodes_updates_and_encodes_per_chunk(tmp_path, small_blocks, monkeypatch, fmt):
    """[Note: one pass per chunk]: chunks of a compressed slice give the bytes and weights of one
    chunk, the native codecs those of the torch ones, and the pass's checksums are the files' own."""
    # The stochastic rounding seed comes from each store's random id: the same for all three here.
    seed = lambda manifest, step, index: step * 1_000_003 + index  # noqa: E731
    monkeypatch.setattr(engine, "rounding_seed", seed)
    monkeypatch.setattr(store_module, "rounding_seed", seed)
    runs = {}
    for name, chunk, use_native in (("chunked", 256, True), ("whole", 1 << 30, True), ("torch", 256, False)):
        with contextlib.ExitStack() as stack:
            if not use_native:
                stack.enter_context(native.disabled())
            runs[name], _ = train(tmp_path / name, chunk, monkeypatch, state_format=fmt)
    for other in ("whole", "torch"):
        for p, q in zip(runs["chunked"].parameters(), runs[other].parameters()):
            assert torch.equal(p, q), other
    with nearstep.Store.open(tmp_path / "chunked") as a, nearstep.Store.open(tmp_path / "whole") as b, \
            nearstep.Store.open(tmp_path / "torch") as c:
        m = a.manifest
        assert m.format.name == fmt and len(m.slices) > 1
        assert max(m.slice_file_bytes(s.index) for s in m.slices) > 2 * CHECKSUM_BLOCK
        assert m.committed == b.manifest.committed == c.manifest.committed  # same bytes, same checksums
        assert a.verify() == [] and b.verify() == [] and c.verify() == []


@pytest.mark.parametrize("fmt", ["fp32", "bf16-sr+8bit-b32", "bf16-kahan", "8bit-linear-b64"])
def test_a_pass_on_two_threads_gives_the_numbers_of_one(tmp_path, small_blocks, monkeypatch, fmt):
    """[Note: a pass on several cores]: cores=(0, 1) on the inline device runs each chunk on two
    threads; weights, store bytes, checksums and spike counts are those of one thread."""
    seed = lambda manifest, step, index: step * 7919 + index  # noqa: E731  (one seed for both stores)
    monkeypatch.setattr(engine, "rounding_seed", seed)
    monkeypatch.setattr(store_module, "rounding_seed", seed)
    monkeypatch.setattr(engine, "SPLIT", 64)  # cut chunks of 4096 into several runs
    guards = nearstep.Guards(spike_clip=0.5, spike_warmup=1)
    cores = tuple(sorted(os.sched_getaffinity(0)))[:2]
    if len(cores) < 2:
        cores = (cores[0], cores[0])  # two threads on one core: the same split, only slower
    runs, stats = {}, {}
    for name, device in (("one", nearstep.DeviceConfig(backend="inline")),
                         ("two", nearstep.DeviceConfig(backend="inline", cores=cores))):
        runs[name], stats[name] = train(tmp_path / name, 4096, monkeypatch, state_format=fmt, device=device,
                                        guards=guards)
    for p, q in zip(runs["one"].parameters(), runs["two"].parameters()):
        assert torch.equal(p, q)
    assert stats["one"]["spike_clipped"] == stats["two"]["spike_clipped"] > 0
    with nearstep.Store.open(tmp_path / "one") as a, nearstep.Store.open(tmp_path / "two") as b:
        assert a.manifest.committed == b.manifest.committed and a.verify() == [] and b.verify() == []


def test_thread_ranges_cut_on_split_multiples_and_cover_every_element():
    bounds = [(0, 10_000), (10_240, 10_300), (12_288, 40_000)]
    segments = [0, 1, 2]
    for threads in (1, 2, 3, 8):
        cuts = engine._cuts(segments, bounds, 40_960, threads, 2048)
        assert cuts[0] == 0 and cuts[-1] == 40_960 and 2 <= len(cuts) <= threads + 1
        assert cuts == sorted(set(cuts))
        for cut in cuts[1:-1]:  # inside a segment, a multiple of the step from its start
            j = next(j for j, (lo, hi) in enumerate(bounds) if lo <= cut < hi)
            assert (cut - bounds[j][0]) % 2048 == 0
        parts = [engine._pieces_between(segments, bounds, lo, hi) for lo, hi in zip(cuts, cuts[1:])]
        covered = {}
        for part in parts:
            for j, lo, hi in part:
                covered.setdefault(j, []).append((lo, hi))
        for j, (lo, hi) in enumerate(bounds):  # each segment exactly, in order, without overlap
            runs = covered[j]
            assert runs[0][0] == lo and runs[-1][1] == hi
            assert all(a[1] == b[0] for a, b in zip(runs, runs[1:]))
        if threads == 2:  # about half the updated elements each
            total = sum(hi - lo for lo, hi in bounds)
            assert abs(sum(hi - lo for j, lo, hi in parts[0]) - total / 2) <= 2048


def test_chunked_pass_equals_one_chunk_and_torch_and_commits_true_checksums(tmp_path, small_blocks, monkeypatch):
    chunked, _ = train(tmp_path / "chunked", 256, monkeypatch)
    whole, _ = train(tmp_path / "whole", 1 << 30, monkeypatch)
    for p, q in zip(chunked.parameters(), whole.parameters()):
        assert torch.equal(p, q)
    with nearstep.Store.open(tmp_path / "chunked") as a, nearstep.Store.open(tmp_path / "whole") as b:
        m = a.manifest
        assert m.checksum_block == CHECKSUM_BLOCK and len(m.slices) > 1
        assert max(m.slice_file_bytes(s.index) for s in m.slices) > 4 * CHECKSUM_BLOCK
        assert m.committed == b.manifest.committed  # same bytes, same checksums
        assert a.verify() == [] and b.verify() == []  # the checksums of the pass are the files' own
    torch.manual_seed(0)
    reference = Wide()
    opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, fused=True)
    g = torch.Generator().manual_seed(1)
    for x, y in [(torch.randn(16, 96, generator=g), torch.randn(16, 7, generator=g)) for _ in range(6)]:
        nn.functional.mse_loss(reference(x), y).backward()
        opt.step()
        opt.zero_grad()
    for p, q in zip(chunked.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


def test_spike_clip_counts_add_up_over_chunks(tmp_path, small_blocks, monkeypatch):
    guards = nearstep.Guards(spike_clip=0.5, spike_warmup=1)
    chunked, a = train(tmp_path / "chunked", 128, monkeypatch, guards=guards)
    whole, b = train(tmp_path / "whole", 1 << 30, monkeypatch, guards=guards)
    assert a["spike_clipped"] == b["spike_clipped"] > 0
    for p, q in zip(chunked.parameters(), whole.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("guards", [nearstep.Guards(telemetry=True), nearstep.Guards(update_clip=1e-3)],
                         ids=["telemetry", "update_clip"])
def test_per_tensor_guards_take_the_unchunked_pass(tmp_path, small_blocks, monkeypatch, guards):
    chunked, a = train(tmp_path / "small", 128, monkeypatch, guards=guards)
    whole, b = train(tmp_path / "whole", 1 << 30, monkeypatch, guards=guards)
    for p, q in zip(chunked.parameters(), whole.parameters()):
        assert torch.equal(p, q)
    assert a["update_clipped"] == b["update_clipped"]
    with nearstep.Store.open(tmp_path / "small") as s:
        assert s.verify() == []


@pytest.mark.parametrize("where", ["inside a region", "in a region's padding"])
def test_a_corrupted_slice_is_refused_and_nothing_changes(tmp_path, small_blocks, monkeypatch, where):
    path = tmp_path / "store"
    model, _ = train(path, 256, monkeypatch, steps=2)
    m = store_module.read_manifest(path)
    k = max(range(len(m.slices)), key=m.slice_file_bytes)
    extent = m.image(k).extent
    victim = path / "slices" / f"s{k:06d}.g{m.committed[k].generation}"
    offset = 4 * (extent // 2) if where == "inside a region" else 4 * extent + 8
    assert offset < -(-extent * 4 // PAGE) * PAGE, "the padding exists in this layout"
    before = [p.detach().clone() for p in model.parameters()]
    monkeypatch.setattr(engine, "PASS_CHUNK", 256)
    with nearstep.AdamW(model.parameters(), lr=1e-2, store=path, device="inline", slice_mb=0.03) as opt:
        # Corrupted after the optimizer loaded the weights (which checks them), before the step reads it.
        data = bytearray(victim.read_bytes())
        data[offset] ^= 0x40
        victim.write_bytes(bytes(data))
        nn.functional.mse_loss(model(torch.randn(16, 96)), torch.randn(16, 7)).backward()
        with pytest.raises(nearstep.StoreCorruptError, match=f"slice {k} .* is corrupted.*Nothing was updated"):
            opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert store_module.read_manifest(path).step == 2
