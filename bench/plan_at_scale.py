"""The planner's tables for Llama-class models at scale (docs/planner.md, "At scale, on paper").

    python bench/plan_at_scale.py [--profile docs/results/2026-12-03/profile.json]

Assumptions, all stated in the output: H100-class accelerators (989 dense bf16 TFLOP/s at 40% MFU),
4M tokens per step, 8 GPUs per node, PCIe Gen5 host links (25 GB/s per GPU each way, bf16 gradients
and weights), Gen4 NVMe drives (7 GB/s read, 5 GB/s write, 3.84 TB, 1 DWPD over 5 years), and a
device of 8 cores per GPU at this machine's measured per-core rates.
"""

from __future__ import annotations

import argparse

from nearstep.planner import Drive, PlanInputs, Profile, load_profile, plan

MODELS = {"7B": 6.74e9, "70B": 70.6e9, "405B": 405.9e9}
GPUS = (1, 8, 64)
DRIVES = (1, 4, 8)
FORMATS = ("fp32", "bf16-sr+8bit")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--profile", default=None)
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


if __name__ == "__main__":
    main()
