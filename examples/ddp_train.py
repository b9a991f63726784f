"""Train with nearstep on several ranks: DDP (default), FSDP2, or plain data parallel.

One machine, two CPU ranks (gloo; on GPUs the same script uses NCCL):

    torchrun --nproc-per-node 2 examples/ddp_train.py --store runs/ddp/state

Run the same line again and it resumes from the store set at the last step every
rank committed. Each rank keeps its half of the AdamW state in its own store,
``runs/ddp/state/rank0`` and ``rank1``. ``--wrap fsdp2`` shards the model with
``fully_shard``; ``--wrap none`` is plain data parallel (nearstep averages the
gradients itself).

The data is synthetic (a fixed random teacher network labels random inputs), so
the script needs nothing but torch and nearstep.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn

import nearstep


def build_model(width: int) -> nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank
    return nn.Sequential(nn.Linear(32, width), nn.GELU(), nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(),
                         nn.Linear(width, 10))


def global_batch(step: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch ``step`` of the whole run, the same on every rank (each takes its part)."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(size, 32, generator=g)
    teacher = torch.Generator().manual_seed(7)
    w = torch.randn(32, 10, generator=teacher)
    return x, (x @ w).argmax(dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="runs/ddp/state", help="the store set: rank<N> directories under it, or a {rank} template")
    parser.add_argument("--wrap", choices=("ddp", "fsdp2", "none"), default="ddp")
    parser.add_argument("--mode", choices=("sync", "overlap", "delayed"), default="overlap")
    parser.add_argument("--steps", type=int, default=50, help="train until this step (a resumed run does the rest)")
    parser.add_argument("--batch", type=int, default=64, help="global batch, split over the ranks")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--device", choices=("emulated", "inline"), default="emulated", help="nearstep's device backend")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} does not split over {world} ranks")
    device = torch.device("cuda") if cuda else torch.device("cpu")

    model = build_model(args.width).to(device)
    if args.wrap == "ddp":
        model = nn.parallel.DistributedDataParallel(model)
    elif args.wrap == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(model)

    # The optimizer is built on every rank, after DDP/FSDP2 wrapped the model. With an existing
    # store set it resumes: the stores' master weights become the model's on every rank.
    opt = nearstep.AdamW(model.named_parameters(), lr=3e-3, weight_decay=0.01, max_grad_norm=1.0,
                         store=args.store, mode=args.mode, model=model, device=args.device,
                         sharding=nearstep.ShardingConfig(timeout=120))
    start = opt.stats()["step"]
    if rank == 0:
        stats = opt.stats()
        print(f"{world} ranks, {args.wrap}, {args.mode} mode; store set {args.store} at step {start}; "
              f"this rank's store holds {stats['local_elements']:,} of {sum(p.numel() for p in build_model(args.width).parameters()):,} "
              f"parameters' state", flush=True)
    per_rank = args.batch // world
    with opt:
        for step in range(start, args.steps):
            x, y = global_batch(step, args.batch)
            x, y = x[rank * per_rank : (rank + 1) * per_rank].to(device), y[rank * per_rank : (rank + 1) * per_rank].to(device)
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            if rank == 0 and (step + 1) % 10 == 0:
                print(f"step {step + 1}: loss {loss.item():.4f} (rank 0's half of the batch)", flush=True)
        opt.synchronize()  # on every rank: the last step's weights reach every rank
        if rank == 0:
            stats = opt.stats()
            print(f"done at step {stats['step']}; per step and rank: {stats['link_bytes_per_step'] / 2**20:.2f} MiB over "
                  f"the host link, {stats['collective_bytes_sent_per_step'] / 2**20:.2f} MiB sent to other ranks", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
