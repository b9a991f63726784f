"""The planner's tables for Llama-class models at scale (docs/planner.md, "At scale, on paper").

    python bench/plan_at_scale.py [--profile docs/results/2026-12-03/profile.json] [--peers OUT_STEM]

Assumptions, all stated in the output: H100-class accelerators (989 dense bf16 TFLOP/s at 40% MFU),
4M tokens per step, 8 GPUs per node, PCIe Gen5 host links (25 GB/s per GPU each way, bf16 gradients
and weights), Gen4 NVMe drives (7 GB/s read, 5 GB/s write, 3.84 TB, 1 DWPD over 5 years), and a
device of 8 cores per GPU at this machine's measured per-core rates.

``--peers OUT_STEM`` also prints the planner's figure for the settings of ZeRO-Infinity, GreedySnake and
MLP-Offload that docs/planner.md compares with, and writes OUT_STEM.txt and OUT_STEM.json.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib

from nearstep.planner import Drive, PlanInputs, Profile, load_profile, plan

MODELS = {"7B": 6.74e9, "70B": 70.6e9, "405B": 405.9e9}
GPUS = (1, 8, 64)
DRIVES = (1, 4, 8)
FORMATS = ("fp32", "bf16-sr+8bit")


# Each peer's setting, as far as its sources state it (docs/planner.md, "Published figures"); what a
# source does not state is the at-scale assumption above, and the table says so.
PEERS = (
    # name, the paper's figure and what it measures, params, GPUs, GPUs/node, drives/node, peak TFLOP/s,
    # MFU, tokens per step (None: the planner's best case over the batch size)
    ("ZeRO-Infinity, 512 V100 (32 DGX-2)", "TFLOP/s per GPU", 48.8, 1e12, 512, 16, 16, 125.0, 0.39, 4e6),
    ("GreedySnake, GPT-65B, 1 A100", "speed-up over ZeRO-Infinity", 1.96, 65e9, 1, 1, 1, 312.0, 0.4, None),
    ("GreedySnake, GPT-65B, 4 A100", "speed-up over ZeRO-Infinity", 1.93, 65e9, 4, 4, 1, 312.0, 0.4, None),
    ("GreedySnake, GPT-175B, 1 A100", "speed-up over ZeRO-Infinity", 2.53, 175e9, 1, 1, 1, 312.0, 0.4, None),
    ("MLP-Offload, 70B, 4 GPUs, 8192 tokens", "speed-up over DeepSpeed ZeRO-3 offload (up to)", 2.5, 70e9, 4, 4, 1,
     312.0, 0.4, 8192.0),
)


def _peer_plan(params, gpus, per_node, drives, tflops, mfu, tokens, rates, gain, drive):
    profile = Profile(drive=drive, drives_per_node=drives, update_rate=rates, second_core_gain=gain, link_gbps=25.0,
                      commit_s=0.005, source="assumed")
    compute = 6 * params * tokens / (gpus * tflops * 1e12 * mfu)
    return plan(PlanInputs(params=int(params), compute_s=compute, profile=profile, state_format="fp32", ranks=gpus,
                           nodes=max(1, gpus // per_node), device_cores=8, link_bytes=2, slices=64))


def peers(rates, gain, drive, stem: str) -> None:
    """The planner's figure for each peer's setting: TFLOP/s per GPU in overlap mode, or the speed-up of
    overlap over sync (the planner's stand-in for a runtime that does not overlap the update) at the
    paper's batch, or the best one over batch sizes of 1e3..1e9 tokens where the paper's batch is unknown."""
    rows = []
    for name, what, paper, params, gpus, per_node, drives, tflops, mfu, tokens in PEERS:
        if what.startswith("TFLOP"):
            pl = _peer_plan(params, gpus, per_node, drives, tflops, mfu, tokens, rates, gain, drive)
            ours, note = 6 * params * tokens / (gpus * pl.step_s["overlap"]) / 1e12, f"{tokens:.0e} tokens/step"
        else:
            grid = [tokens] if tokens else [10 ** (3 + k / 10) for k in range(61)]
            best = max(grid, key=lambda t: (lambda q: q.step_s["sync"] / q.step_s["overlap"])(
                _peer_plan(params, gpus, per_node, drives, tflops, mfu, t, rates, gain, drive)))
            pl = _peer_plan(params, gpus, per_node, drives, tflops, mfu, best, rates, gain, drive)
            ours = pl.step_s["sync"] / pl.step_s["overlap"]
            note = f"{best:.3g} tokens/step" + ("" if tokens else " (the planner's best)")
        rows.append({"setting": name, "measures": what, "paper": paper, "planner": ours, "ratio": ours / paper,
                     "tokens_per_step": note, "overlap_s": pl.step_s["overlap"], "sync_s": pl.step_s["sync"],
                     "bound": pl.bound["overlap"], "io_s": pl.io_s, "compute_s": pl.inputs.compute_s})
    lines = ["| setting | figure | paper | planner | planner / paper | planner's batch | overlap s/step | bound |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['measures']} | {r['paper']:g} | {r['planner']:.2f} | {r['ratio']:.2f} | "
                     f"{r['tokens_per_step']} | {r['overlap_s']:.3g} | {r['bound']} |")
    text = "\n".join(lines)
    print(text)
    pathlib.Path(stem + ".txt").write_text(text + "\n")
    pathlib.Path(stem + ".json").write_text(json.dumps(
        {"assumptions": "fp32 AdamW store, bf16 link at 25 GB/s, 8 device cores per GPU at the profile's rates, "
                        "drives 7 GB/s read, 5 GB/s write (not the papers' drives, which their sources do not give)",
         "rows": rows}, indent=2, default=lambda x: None if isinstance(x, float) and not math.isfinite(x) else x))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--profile", default=None)
    parser.add_argument("--peers", default=None, metavar="OUT_STEM",
                        help="also the peers' settings, into OUT_STEM.txt and OUT_STEM.json")
    args = parser.parse_args()
    measured = load_profile(args.profile)
    rates = measured.update_rate if measured else {"fp32": 7e8, "bf16-sr+8bit": 6e8}
    gain = measured.second_core_gain if measured else 1.15
    drive = Drive(read_gbps=7.0, write_gbps=5.0, capacity_tb=3.84, dwpd=1.0, warranty_years=5.0)
    print("| model | GPUs | drives/node | format | store TB/node | overlap s/step | bound | DWPD | drive rating lasts |")
    print("|---|---|---|---|---|---|---|---|---|")
    keeps = []
    for name, params in MODELS.items():
        for gpus in GPUS:
            nodes = max(1, gpus // 8)
            compute = 6 * params * 4e6 / (gpus * 989e12 * 0.4)
            for drives in DRIVES:
                profile = Profile(drive=drive, drives_per_node=drives, update_rate=rates, second_core_gain=gain,
                                  link_gbps=25.0, commit_s=0.005, source="assumed")
                for fmt in FORMATS:
                    pl = plan(PlanInputs(params=int(params), compute_s=compute, profile=profile, state_format=fmt,
                                         ranks=gpus, nodes=nodes, device_cores=8, link_bytes=2, slices=64))
                    store_tb = pl.store_bytes * (gpus // nodes) / 1e12
                    life = pl.drive_life_days["overlap"]
                    lasts = f"{life / 365:.1f} years" if life >= 365 else f"{life:.0f} days"
                    print(f"| {name} | {gpus} | {drives} | {fmt} | {store_tb:.2f} | {pl.step_s['overlap']:.1f} | "
                          f"{pl.bound['overlap']} | {pl.drive_writes_per_day['overlap']:.1f} | {lasts} |")
                    if life >= 365 and store_tb <= drives * drive.capacity_tb:
                        keeps.append((name, gpus, drives, fmt))
    print()
    print("Smallest drive count per node and format that keeps a 1-DWPD drive within its rating for a year")
    print("of training at the overlap pace (and holds the store):")
    for name in MODELS:
        for gpus in GPUS:
            ok = [(d, f) for n, g, d, f in keeps if n == name and g == gpus]
            best = min(ok, key=lambda x: (x[0], FORMATS.index(x[1]))) if ok else None
            print(f"- {name} on {gpus} GPU(s): " + (f"{best[0]} drive(s), {best[1]}" if best else
                                                    f"none of {DRIVES} drives with {', '.join(FORMATS)}"))
    if args.peers:
        print()
        peers(rates, gain, drive, args.peers)


if __name__ == "__main__":
    main()
