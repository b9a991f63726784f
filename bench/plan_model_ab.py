"""The planner's step model of 2026-12-03 against today's, on the same recorded runs and profiles
(docs/planner.md, "2026-12-04: 18 of 18 rows within +-15%", the "old model" column).

    python bench/plan_model_ab.py RUN.json PROFILE.json [RUN.json PROFILE.json ...]

The old model: the loop's link at the plain copy rate, no contention between loop and device,
overlap's tail one slice's update (``max(c + link, c/3 + device) + device / slices``) and delayed
without the landing (``max(c + link, device)``).
"""

from __future__ import annotations

import dataclasses
import json
import sys

from nearstep import planner
from nearstep.planner import PlanInputs, plan


def old_model(run: dict, profile: planner.Profile) -> dict[str, float]:
    """Predicted seconds per step by the 2026-12-03 model, for each nearstep row of ``run``."""
    bare = dataclasses.replace(profile, staging_gbps=None, loop_slowdown=0.0, device_slowdown=0.0)
    rows = run["variants"]
    c = rows["none"]["ms_per_step"] / 1e3
    out = {}
    for key, row in rows.items():
        mode, _, fmt = key.partition("@")
        if mode not in planner.MODES:
            continue
        first = row["rounds"][0]
        pl = plan(PlanInputs(params=int(first["params"]), compute_s=c, profile=bare, state_format=fmt or "fp32",
                             slices=int(first.get("slices", 16))))
        d, link = pl.device_s, pl.link_s
        out[key] = {"sync": c + link + d, "overlap": max(c + link, c / 3 + d) + d / pl.inputs.slices,
                    "delayed": max(c + link, d)}[mode]
    return out


def main(argv: list[str]) -> int:
    if not argv or len(argv) % 2:
        print(__doc__, file=sys.stderr)
        return 2
    print("| model | row | measured ms | old model / measured | predicted ms | new / measured | bound |")
    print("|---|---|---|---|---|---|---|")
    for run_path, profile_path in zip(argv[::2], argv[1::2]):
        run = json.loads(open(run_path).read())
        profile = planner.Profile.from_json(json.loads(open(profile_path).read()))
        new = {r["row"]: r for r in planner.validate(run, profile)}
        for key, predicted in old_model(run, profile).items():
            r = new[key]
            print(f"| {run['options']['model']} | `{key}` | {r['measured_ms']:.1f} | {predicted * 1e3 / r['measured_ms']:.3f} "
                  f"| {r['predicted_ms']:.1f} | {r['ratio']:.3f} | {r['bound']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
