"""Smoke test of ``nearstep bench io``: it runs at tiny sizes, prints its table, writes JSON, cleans up."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from conftest import assert_positive
from nearstep import uring
from nearstep.bench import io
from nearstep.bench.io import main
from nearstep.formats import native


def test_quick_run_reports_every_section_and_leaves_nothing_behind(tmp_path, capsys):
    scratch = tmp_path / "b"
    out = tmp_path / "out.json"

    assert main(["--quick", "--no-deepspeed", "--dir", str(scratch), "--json", str(out)]) == 0

    res = json.loads(out.read_text())
    assert res["machine"] and res["date"] and res["options"]["quick"] is True

    bw = res["bandwidth"]
    assert_positive(bw, "bytes", "read_ratio", "write_ratio")
    assert_positive(bw["median_gbps"], "raw_read", "raw_write", "store_read", "store_write")
    assert len(bw["rounds_gbps"]) == res["options"]["repeats"] == 1
    assert isinstance(bw["read_pass"], bool) and isinstance(bw["write_pass"], bool)
    assert bw["deepspeed"]["available"] is False and bw["crc32"] in ("zlib", "isal") and bw["io_threads"] >= 1
    assert_positive(res["end_to_end"], "params", "params_per_second", "state_bytes_per_step", "state_gbps")

    update = res["update"]
    assert_positive(update, "nearstep_params_per_second", "torch_params_per_second", "ratio")
    assert isinstance(update["pass"], bool)
    assert list(update["formats"]) == [*io.FORMATS, io.UNCHECKED, io.TORCH_CODECS]
    for name, row in update["formats"].items():
        assert_positive(row, "bytes_per_param_per_step", "params_per_second")
        if update["cores"] > 1 and name != io.UNCHECKED:  # the second column: the pass on several threads
            assert row["cores"] == update["cores"] and row["params_per_second_cores"] > 0
        # the codec-free pass: every compressed format, and only those
        assert ("params_per_second_codec_free" in row) == (name in io.FORMATS and name != "fp32")
    assert update["codecs"] == native.status()
    assert update["formats"]["fp32"]["bytes_per_param_per_step"] == update["formats"][io.UNCHECKED]["bytes_per_param_per_step"]

    peak = res["peak"]
    assert_positive(peak, "state_bytes", "budget_bytes", "baseline_rss_anon", "peak_rss_anon", "peak_vm_rss",
              "peak_rss_shmem", "peak_private", "peak_slot_memory", "slot_ratio", "rss_anon_ratio", "private_ratio")
    # Tiny sizes sit far inside a 1 GiB budget: a MISS here is a wrong measurement, not a slow disk.
    assert peak["slot_pass"] and peak["private_pass"]
    assert peak["peak_slot_memory"] <= peak["peak_shared_anon"] + peak["peak_rss_anon"]

    table = capsys.readouterr().out
    for label in ("machine:", "raw read", "raw write", "store read", "store write", "median", "store/raw read",
                  "store/raw write", "end-to-end inline AdamW step", "nearstep kernels.update_",
                  "torch.optim.AdamW(fused=True)", "nearstep/torch", "peak slot memory", "peak RssAnon",
                  "peak private memory", "peak RssShmem", "host-link staging", "DeepSpeed async I/O: not run",
                  "fp32, no checksums", "bf16-sr+8bit, torch codecs", "checked read", "vs fp32"):
        assert label in table, label

    assert not scratch.exists() or not any(scratch.rglob("*"))


def test_a_failing_measurement_still_removes_what_the_run_made(tmp_path, monkeypatch):
    def fail(opts, work):
        (work / "store").mkdir()
        (work / "store" / "s000000.g0").write_bytes(b"x" * 4096)
        raise RuntimeError("disk gone")

    monkeypatch.setattr(io, "_bandwidth", fail)
    scratch = tmp_path / "deep" / "b"
    with pytest.raises(RuntimeError, match="disk gone"):
        main(["--quick", "--dir", str(scratch), "--json", str(tmp_path / "out.json")])
    assert not (tmp_path / "deep").exists() and not (tmp_path / "out.json").exists()


class _FakeAioHandle:
    """Stands in for DeepSpeed's ``aio_handle``: the same calls, done with plain pread/pwrite."""

    def __init__(self, block_size, queue_depth, single_submit, overlap_events, intra_op_parallelism):
        self.pending = 0

    def new_cpu_locked_tensor(self, numel, example):
        return torch.zeros(numel, dtype=example.dtype)

    def free_cpu_locked_tensor(self, tensor):
        return True

    def async_pread(self, tensor, path, offset):
        fd = os.open(path, os.O_RDONLY)
        try:
            tensor.numpy()[:] = np.frombuffer(os.pread(fd, tensor.numel(), offset), dtype=np.uint8)
        finally:
            os.close(fd)
        self.pending += 1
        return 0

    def async_pwrite(self, tensor, path, offset):
        fd = os.open(path, os.O_WRONLY)
        try:
            os.pwrite(fd, tensor.numpy().tobytes(), offset)
        finally:
            os.close(fd)
        self.pending += 1
        return 0

    def wait(self):
        done, self.pending = self.pending, 0
        return done


class _FakeAioOp:
    aio_handle = _FakeAioHandle


def test_deepspeed_row_reads_and_writes_the_same_slice_files(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(io, "_deepspeed_aio", lambda: (_FakeAioOp(), "fake"))
    out = tmp_path / "out.json"

    assert main(["--quick", "--skip-peak", "--dir", str(tmp_path / "b"), "--json", str(out)]) == 0

    bw = json.loads(out.read_text())["bandwidth"]
    ds = bw["deepspeed"]
    assert ds["available"] is True and ds["about"] == "fake" and ds["target"] == io.PEER_TARGET
    assert ds["aio"] == {"block_bytes": io.DS_BLOCK, "queue_depth": io.DS_QUEUE_DEPTH,
                         "intra_op_parallelism": io.DS_THREADS, "huge_pages": ds["aio"]["huge_pages"]}
    assert isinstance(ds["aio"]["huge_pages"], bool)
    assert_positive(bw["median_gbps"], "deepspeed_read", "deepspeed_write")
    assert_positive(ds, "read_ratio", "write_ratio")
    assert isinstance(ds["read_pass"], bool) and isinstance(ds["write_pass"], bool)
    # Where the store runs on the io_uring ring, the thread pool runs alongside as "pool".
    sides = ("raw", "store", "checked", "deepspeed") + (("pool",) if uring.ring_support()[0] else ())
    assert sorted(bw["seconds"]) == sorted(f"{side}_{op}" for side in sides for op in ("read", "write"))
    table = capsys.readouterr().out
    for label in ("ds read", "ds write", "store/DeepSpeed read", "store/DeepSpeed write", "DeepSpeed fake async I/O"):
        assert label in table, label
    assert (("store/pool read" in table) and "io_uring, queue depth 32" in table) == ("pool" in sides)
    assert "checked/DeepSpeed read" in table and "checked write" in table


def test_the_store_side_on_the_thread_pool_alone(tmp_path, capsys):
    out = tmp_path / "out.json"
    assert main(["--quick", "--skip-peak", "--no-deepspeed", "--io-backend", "threads", "--io-threads", "3",
                 "--dir", str(tmp_path / "b"), "--json", str(out)]) == 0
    bw = json.loads(out.read_text())["bandwidth"]
    assert bw["io_backend"] == "thread pool of 3" and bw["pool_io"] is None
    assert sorted(bw["seconds"]) == sorted(f"{side}_{op}" for side in ("raw", "store", "checked")
                                           for op in ("read", "write"))
    assert "store: thread pool of 3" in capsys.readouterr().out
