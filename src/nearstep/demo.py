"""``nearstep demo``: train a small model with its optimizer state in a store.

No configuration: the store goes under ``./.nearstep/`` and the update runs on
the emulated device (a separate process standing in for a computational SSD).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

from .optim import AdamW, default_store_path

__all__ = ["main"]


def _synthetic_task(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Four Gaussian blobs in 64 dimensions: learnable in a few dozen steps."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(4, 64, generator=g) * 2
    labels = torch.randint(0, 4, (2048,), generator=g)
    points = centers[labels] + torch.randn(2048, 64, generator=g)
    return points, labels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nearstep demo", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps (default 40)")
    parser.add_argument("--store", type=Path, default=None, help="store directory (default: new under ./.nearstep/)")
    parser.add_argument("--backend", choices=["emulated", "inline"], default="emulated")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")

    torch.manual_seed(0)
    x, y = _synthetic_task(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.LayerNorm(256), nn.Linear(256, 4))
    store = args.store or default_store_path("demo")
    print(f"nearstep demo: a {sum(p.numel() for p in model.parameters()):,}-parameter classifier, "
          f"AdamW state in {store}, update on the {args.backend} device")
    with AdamW(model.named_parameters(), lr=3e-3, store=store, device=args.backend, slice_mb=0.25) as opt:
        info = opt.device.info
        print(f"device: {info.backend} (pid {info.pid}, cores {list(info.cores)}), "
              f"{len(opt._layout.slices)} slices, O_DIRECT {'on' if info.direct_io else 'off'}")
        t0 = time.perf_counter()
        for step in range(1, args.steps + 1):
            batch = torch.randint(0, len(x), (128,))
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            loss.backward()
            opt.step()
            opt.zero_grad()
            if step == 1 or step % 10 == 0 or step == args.steps:
                print(f"  step {step:4d}  loss {loss.item():.4f}")
        elapsed = time.perf_counter() - t0
        with torch.no_grad():
            accuracy = (model(x).argmax(1) == y).float().mean().item()
        stats = opt.stats()
    print(f"done: {args.steps} steps in {elapsed:.2f} s ({stats['step_ms']:.1f} ms per optimizer step), "
          f"accuracy {accuracy:.3f}")
    print(f"store: committed step {stats['step']}, read {stats['device_store_read_bytes'] / 2**20:.1f} MiB, "
          f"wrote {stats['device_store_write_bytes'] / 2**20:.1f} MiB; host link in "
          f"{stats['device_link_in_bytes'] / 2**20:.1f} MiB, out {stats['device_link_out_bytes'] / 2**20:.1f} MiB")
    print(f"resume with: nearstep demo --store {store}")
    return 0
