"""Lending the device's cores to the training loop while the device is idle (cores.py)."""

from __future__ import annotations

import os
import threading

import pytest
import torch

import nearstep
from conftest import batches, loss_of, make_model
from nearstep.cores import CoreLending

CORES = sorted(os.sched_getaffinity(0))
needs_two = pytest.mark.skipif(len(CORES) < 2, reason="lending needs a core for the loop and one for the device")


@pytest.fixture
def all_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(len(CORES))
    yield len(CORES)
    torch.set_num_threads(before)


@needs_two
def test_busy_leaves_the_device_cores_and_idle_takes_them_back(all_threads) -> None:
    lending = CoreLending([CORES[-1]])
    assert lending.lends and (lending.idle_threads, lending.busy_threads) == (all_threads, all_threads - 1)
    lending.device_busy()
    assert torch.get_num_threads() == all_threads - 1 and lending.busy
    lending.device_busy()  # already busy: no second switch
    lending.device_idle()
    assert torch.get_num_threads() == all_threads and not lending.busy
    assert lending.switches == 2


@needs_two
def test_other_threads_never_switch(all_threads) -> None:
    lending = CoreLending([CORES[-1]])
    seen = []
    t = threading.Thread(target=lambda: (lending.device_busy(), seen.append(lending.busy)))
    t.start()
    t.join()
    assert seen == [False] and lending.switches == 0 and torch.get_num_threads() == all_threads


def test_nothing_to_lend_when_the_loop_cannot_run_on_the_device_cores() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        lending = CoreLending([CORES[-1]])
        assert not lending.lends
        lending.device_busy()
        assert torch.get_num_threads() == 1 and lending.switches == 0
    finally:
        torch.set_num_threads(before)


def test_the_inline_device_refuses_to_lend() -> None:
    with pytest.raises(ValueError, match="lend_idle_cores"):
        nearstep.DeviceConfig(backend="inline", lend_idle_cores=True)


@needs_two
@pytest.mark.parametrize("mode", ["sync", "overlap"])
def test_lending_trains_as_torch_and_restores_the_thread_count(mode, all_threads, tmp_path) -> None:
    torch.manual_seed(0)
    model = make_model()
    ref = make_model()
    ref.load_state_dict(model.state_dict())
    device = nearstep.DeviceConfig(cores=(CORES[-1],), lend_idle_cores=True)
    opt = nearstep.AdamW(model.named_parameters(), lr=1e-2, store=tmp_path / "s", device=device, slice_mb=0.004,
                         mode=mode, model=model if mode == "overlap" else None)
    torch_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    steps = 8
    seen = []
    model.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))  # after nearstep's hooks
    with opt:
        for batch in batches(steps):
            for m, o in ((model, opt), (ref, torch_opt)):
                loss_of(m, batch).backward()
                o.step()
                o.zero_grad()
            inflight = opt._pipeline.inflight
            if inflight is not None:
                inflight.commit.wait(60)  # a loop slower than the device: its step is done before the next forward
        opt.synchronize()
        assert torch.get_num_threads() == all_threads  # idle again once the last commit is done
        # Busy from each step's first queued update, idle again once its commit is done (at the next
        # forward, or at the next step() in sync mode); the forwards all ran on every core.
        assert opt.stats()["lent_core_switches"] >= 2 * steps  # more where backward outruns the early applies
        assert seen == [all_threads] * steps
        for a, b in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert torch.get_num_threads() == all_threads
