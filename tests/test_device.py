"""The device verbs, used directly: info, memory, the request queue, completions, statistics."""

from __future__ import annotations

import time

import pytest
import torch

import nearstep
from nearstep import kernels, rules
from nearstep.protocol import Apply, Commit, Prefetch
from nearstep.staging import StagingLayout
from test_store import ADAM_STATE, make_store, specs


def test_info_memory_queue_and_stats(backend, tmp_path) -> None:
    params = specs((500,), (20, 30))
    store = make_store(tmp_path / "s", params, slice_bytes=2048)
    masters = {k: store.read_slice(k)["master"].clone() for k in range(len(store.manifest.slices))}
    with nearstep.open_device(store, backend=backend, memory_budget="64MiB") as dev:
        info = dev.info
        assert info.backend == backend and "adamw" in info.kernels and info.memory_budget == 64 * 2**20
        assert info.slots >= 1 and info.slot_bytes > 0
        layout = StagingLayout.from_manifest(store.manifest)
        mem = dev.alloc(layout.nbytes)
        assert mem.nbytes >= layout.nbytes
        grads = {}
        for staged in layout.slices:
            for seg in staged.segments:
                g = torch.randn(seg.length)
                layout.grad_view(mem.bytes, seg, staged).copy_(g)
                grads[(staged.index, seg.param)] = g
        order = tuple(reversed(range(len(layout.slices))))
        dev.submit(Prefetch(order))
        hyper = rules.AdamWHyper(lr=0.01)
        applies = [dev.submit(Apply(k, (hyper,), (1,) * len(layout.slices[k].segments), 1.0, rules.Guards(), mem.id))
                   for k in order]
        reports = [a.wait(30) for a in applies]
        assert all(len(r) == len(layout.slices[k].segments) for r, k in zip(reports, order))
        manifest = dev.submit(Commit(1, (1, 1), ({"lr": 0.01},))).wait(30)
        assert manifest.step == 1 and all(c.generation == 1 for c in manifest.committed)
        for staged in layout.slices:
            # The weights posted back equal one AdamW step on the same inputs.
            m = masters[staged.index]
            g = torch.cat([grads[(staged.index, seg.param)] for seg in staged.segments])
            ea, es = torch.zeros_like(m), torch.zeros_like(m)
            kernels.update_(hyper, [m], {"exp_avg": [ea], "exp_avg_sq": [es]}, [g], [1], rules.Guards())
            posted = torch.cat([layout.weight_view(mem.bytes, seg, staged) for seg in staged.segments])
            assert torch.equal(posted, m)
        stats = dev.stats()
        state_bytes = store.manifest.state_bytes
        assert stats["store_read_bytes"] == state_bytes and stats["store_write_bytes"] == state_bytes
        assert stats["link_in_bytes"] == stats["link_out_bytes"] == 4 * sum(p.numel for p in params)
        assert stats["compute_seconds"] > 0 and stats["steps_committed"] == 1
    assert set(store.manifest.state_names) == {"master", *ADAM_STATE}


def test_a_device_error_carries_the_device_traceback(backend, tmp_path) -> None:
    store = make_store(tmp_path / "s", specs((100,)))
    with nearstep.open_device(store, backend=backend) as dev:
        done = dev.submit(Apply(7, (rules.AdamWHyper(lr=0.1),), (1,), 1.0, rules.Guards(), 1))
        with pytest.raises(nearstep.DeviceError, match="slice 7 does not exist") as info:
            done.wait(30)
        assert "Traceback" in str(info.value)
        # The device keeps serving after a refused request.
        assert dev.stats()["step"] == 0


def test_a_dead_device_fails_pending_work_within_a_second(tmp_path) -> None:
    store = make_store(tmp_path / "s", specs((100,)))
    dev = nearstep.open_device(store, backend="emulated")
    try:
        dev.kill()
        t0 = time.monotonic()
        with pytest.raises(nearstep.DeviceDiedError, match="died"):
            dev.submit(Commit(1, (1,), ({},))).wait(10)
        assert time.monotonic() - t0 < 1.0 and not dev.alive
    finally:
        dev.close()
        store.close()


def test_a_budget_below_one_slice_is_refused_at_open(backend, tmp_path) -> None:
    store = make_store(tmp_path / "s", specs((3_000_000,)), slice_bytes=64 << 20)
    try:
        with pytest.raises(nearstep.NearstepError if backend == "emulated" else ValueError, match="memory_budget"):
            nearstep.open_device(store, backend=backend, memory_budget="32MiB")
    finally:
        store.close()
