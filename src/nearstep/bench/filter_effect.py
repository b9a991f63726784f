"""``nearstep bench filter-effect``: does removing redundant inputs help? MiniLM on BBC News, with and without the filter.

Three trainings per seed, the same steps, batch and learning rates each time
(torch's AdamW in this process: the question is about the data, not the
optimizer's placement):

* ``filtered``: the training side of the leak-free split (every cluster of
  copies on one side, ``Filter.split``), deduplicated, boilerplate removed.
* ``unfiltered``: the same training side with every copy and boilerplate line
  left in (the articles as the files hold them).
* ``leaky``: the every-5th-file split the demo used before the filter, as it is.

``filtered`` and ``unfiltered`` are scored on the same leak-free held-out
articles; ``leaky`` on its own held-out articles, split into those with a copy
in its training part and the rest, which shows what the leaky split overstates.
Prints a table (mean and spread over seeds) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import tempfile
import time
from typing import Any

import torch
from torch import nn

from nearstep import workloads
from nearstep.bench.report import machine

__all__ = ["main"]


def _train_and_score(train: workloads.TextSplit, evals: dict[str, workloads.TextSplit], seed: int, steps: int,
                     batch: int, seq_len: int) -> dict[str, float]:
    model, tokenizer = workloads.load_minilm_classifier(len(train.classes), seed=seed)
    head = [p for n, p in model.named_parameters() if n.startswith("head.")]
    body = [p for n, p in model.named_parameters() if not n.startswith("head.")]
    opt = torch.optim.AdamW([{"params": body, "lr": 5e-5}, {"params": head, "lr": 2e-3}], weight_decay=0.01)
    order = torch.randperm(len(train.texts), generator=torch.Generator().manual_seed(seed)).tolist()
    model.train()
    for step in range(steps):
        idx = [order[(step * batch + k) % len(order)] for k in range(batch)]
        inputs = workloads.tokenize(tokenizer, [train.texts[i] for i in idx], seq_len)
        loss = nn.functional.cross_entropy(model(**inputs), torch.tensor([train.labels[i] for i in idx]))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    model.eval()
    out = {}
    with torch.no_grad():
        for name, split in evals.items():
            if not split.texts:
                out[name] = float("nan")
                continue
            correct = 0
            for s in range(0, len(split.texts), 64):
                inputs = workloads.tokenize(tokenizer, split.texts[s : s + 64], seq_len)
                correct += int((model(**inputs).argmax(-1) == torch.tensor(split.labels[s : s + 64])).sum())
            out[name] = correct / len(split.texts)
    return out


def _unfiltered_train(train_kept: workloads.TextSplit, f: Any, train_idx: list[int]) -> workloads.TextSplit:
    """The training side with the copies and the boilerplate put back: every member of each cluster, raw text."""
    members: set[int] = set(train_idx)
    clusters = f.clusters()
    root_of = f.cluster_of()
    for i in train_idx:
        if i in root_of:
            members.update(clusters.get(root_of[i], [i]))
    texts, labels = [], []
    for rec in f.corpus.records(0):
        if rec.index in members and hasattr(rec, "text"):
            texts.append(rec.text.strip())
            labels.append(train_kept.classes.index(rec.fields["folder"]))
    return workloads.TextSplit(tuple(texts), tuple(labels), train_kept.classes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nearstep bench filter-effect", description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=96)
    parser.add_argument("--state", type=pathlib.Path, default=None, help="the filter's state folder (default: a temporary one)")
    parser.add_argument("--json", type=pathlib.Path, default=pathlib.Path("bench_filter_effect.json"))
    args = parser.parse_args(argv)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        state = args.state or pathlib.Path(tmp)
        train, held, summary = workloads.load_bbc_news_deduplicated(state)
        from nearstep.data import Filter, FilterConfig, open_corpus

        f = Filter(open_corpus(workloads.bbc_news_dir()), FilterConfig(), state_dir=state)
        f.scan()
        train_idx, _ = f.split(0.2, 0)
        raw_train = _unfiltered_train(train, f, train_idx)
    leaky_train, leaky_held = workloads.load_bbc_news()
    leaked = {t for t in summary.leaked.texts}
    rest = [(t, lab) for t, lab in zip(leaky_held.texts, leaky_held.labels) if t not in leaked]
    leaky_rest = workloads.TextSplit(tuple(t for t, _ in rest), tuple(lab for _, lab in rest), leaky_held.classes)
    runs: list[dict[str, Any]] = []
    for seed in range(args.seeds):
        for name, data, evals in (
            ("filtered", train, {"clean_held": held}),
            ("unfiltered", raw_train, {"clean_held": held}),
            ("leaky", leaky_train, {"leaky_held": leaky_held, "leaked": summary.leaked, "not_leaked": leaky_rest}),
        ):
            t = time.time()
            scores = _train_and_score(data, evals, seed, args.steps, args.batch, args.seq_len)
            runs.append({"seed": seed, "training": name, "train_docs": len(data.texts), **scores, "seconds": time.time() - t})
            print(f"seed {seed} {name:<10} " + " ".join(f"{k}={v:.4f}" for k, v in scores.items()), flush=True)
    rows = []
    for name, metric in (("filtered", "clean_held"), ("unfiltered", "clean_held"), ("leaky", "leaky_held"),
                         ("leaky", "leaked"), ("leaky", "not_leaked")):
        vals = [r[metric] for r in runs if r["training"] == name]
        rows.append({"training": name, "scored_on": metric, "mean": statistics.fmean(vals),
                     "min": min(vals), "max": max(vals), "stdev": statistics.stdev(vals) if len(vals) > 1 else 0.0})
    print(f"\n{'training':<11} {'scored on':<12} {'mean':>7} {'min':>7} {'max':>7} {'stdev':>7}")
    for r in rows:
        print(f"{r['training']:<11} {r['scored_on']:<12} {r['mean']:7.4f} {r['min']:7.4f} {r['max']:7.4f} {r['stdev']:7.4f}")
    sizes = {"filtered_train": len(train.texts), "unfiltered_train": len(raw_train.texts), "clean_held": len(held.texts),
             "leaky_train": len(leaky_train.texts), "leaky_held": len(leaky_held.texts), "leaked": len(summary.leaked.texts)}
    print("sizes: " + ", ".join(f"{k} {v}" for k, v in sizes.items()))
    result = {"bench": "filter-effect", "machine": machine(pathlib.Path(".")), "args": {k: str(v) for k, v in vars(args).items()},
              "sizes": sizes, "runs": runs, "summary": rows, "seconds": time.time() - t0}
    args.json.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.json}")
    return 0
