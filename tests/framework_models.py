"""Models, data and references for tests/test_frameworks.py (training the way users train).

Everything is built from configs in code under a fixed seed; nothing is downloaded.

Run as a script, this module is the fresh process of the ``torch.compile`` test:
``python tests/framework_models.py compile MODE BACKEND STORE OUT`` trains a compiled
TinyNet with nearstep in MODE, then the same compiled workflow with the torch
reference, and saves both results to OUT (with deterministic algorithms, so that two
such processes can be compared bit for bit).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import TinyNet, batches, loss_of, make_model  # noqa: E402

# [Note: tolerances]
# nearstep's sync mode must give torch.optim.AdamW's weights "within fp32 rounding".
# What one correct fp32 AdamW gives against another was measured on the workflows of
# this file: torch's fused=True CPU kernel against its for-loop (foreach=False) one.
# - TinyNet, lr 1e-2, 8 steps, with or without clip_grad_norm_(0.1): at most 2.4e-7
#   apart; rtol=1e-5 needs atol >= 2e-9.
# - tiny Llama under HF Trainer, 6-8 steps, lr 1e-3: at most 1.2e-7 apart; rtol=1e-5
#   needs atol >= 3.4e-9. At lr 1e-2 the same pair is 1.9e-5 apart (atol 1.9e-5
#   needed): Adam turns the rounding noise of near-zero gradient elements into
#   updates of order lr, so the Trainer tests run at lr 1e-3.
# - tiny BERT is not used: its attention key biases have a gradient that is exactly
#   zero in exact arithmetic (softmax is shift-invariant), so their "gradient" is
#   rounding noise and Adam amplifies it to O(lr) (fused vs loop: 5.6e-6, nearstep
#   vs loop: 4.2e-3 at lr 1e-2, all of it in the key biases).
# torch's foreach=True and foreach=False gave bitwise equal weights on all of these.
# So RTOL/ATOL below leave two to three orders of magnitude over what two correct
# implementations differ by, and still catch any real difference (a missed clip, a
# skipped update, a stale weight: 1e-4 and more).
RTOL = 1e-5
ATOL = 1e-6

# Small slices, as tests/test_modes.py: many slices per module stress the hooks.
SLICE_MB = 0.004
WARMUP = 2  # delayed mode's sync warm-up steps in these tests (the default, 10, would cover every step)


# ---------------------------------------------------------------------------
# Comparing results


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters by name (a compiled model's by its original module's names)."""
    return {name.removeprefix("_orig_mod."): p.detach().clone() for name, p in model.named_parameters()}


def assert_weights_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str = "") -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=RTOL, atol=ATOL,
                                   msg=lambda m, name=name: f"{what}{name}: {m}")


def assert_weights_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str = "") -> None:
    assert actual.keys() == expected.keys()
    differ = [name for name in expected if not torch.equal(actual[name], expected[name])]
    if differ:
        worst = max((actual[n] - expected[n]).abs().max().item() for n in differ)
        raise AssertionError(f"{what}{len(differ)} of {len(expected)} parameters are not bitwise equal "
                             f"(first {differ[0]!r}, largest difference {worst:.3g})")


def assert_weights_differ(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str = "") -> None:
    """A sanity check that a comparison means something: the two runs are not the same."""
    worst = max((actual[n] - expected[n]).abs().max().item() for n in expected)
    assert worst > 100 * ATOL, f"{what}the runs should differ, largest difference {worst:.3g}"


def finish(opt: torch.optim.Optimizer) -> None:
    """Land the last update (nearstep, StaleAdamW) and release the optimizer."""
    if hasattr(opt, "synchronize"):
        opt.synchronize()
    if hasattr(opt, "close"):
        opt.close()


def store_bytes(path: os.PathLike | str) -> int:
    """Sum of the sizes of the files under a store directory."""
    return sum(os.path.getsize(Path(root) / f) for root, _dirs, files in os.walk(path) for f in files)


# ---------------------------------------------------------------------------
# Reference for delayed mode


class StaleAdamW(torch.optim.Optimizer):
    """The documented numerics of nearstep's delayed mode, built on torch.optim.AdamW.

    torch's for-loop AdamW updates fp32 master copies with the gradients the model
    has at ``step()`` (after whatever clipping the training loop did). The model
    sees the update of step t only at step t+1's ``step()``, after step t+1's
    backward, so step t+1's gradients are taken on weights one update stale. The
    first ``warmup_steps`` steps land at once, as in sync mode. ``synchronize()``
    lands the pending update.

    It subclasses ``torch.optim.Optimizer`` so that LR schedulers, HF Trainer and
    Lightning drive it exactly as they drive nearstep.
    """

    def __init__(self, params: Iterable[Any], *, lr: float, warmup_steps: int, weight_decay: float = 0.01) -> None:
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))
        self.masters = [[p.detach().clone() for p in g["params"]] for g in self.param_groups]
        self.inner = torch.optim.AdamW(
            [{"params": ms, "lr": g["lr"], "weight_decay": g["weight_decay"]} for ms, g in zip(self.masters, self.param_groups)],
            lr=lr, foreach=False)
        self.warmup_steps = warmup_steps
        self.steps = 0
        self.pending = False

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.synchronize()  # the previous update lands now, after this step's backward
        for group, inner, ms in zip(self.param_groups, self.inner.param_groups, self.masters):
            inner["lr"] = group["lr"]
            for p, m in zip(group["params"], ms):
                m.grad = None if p.grad is None else p.grad.detach().to(m.dtype).clone()
        self.inner.step()
        self.steps += 1
        self.pending = True
        if self.steps <= self.warmup_steps:
            self.synchronize()
        return loss

    @torch.no_grad()
    def synchronize(self) -> None:
        if self.pending:
            for group, ms in zip(self.param_groups, self.masters):
                for p, m in zip(group["params"], ms):
                    p.copy_(m)
            self.pending = False


def reference_optimizer(mode: str, params: Iterable[Any], lr: float) -> torch.optim.Optimizer:
    """What nearstep in ``mode`` is compared with: torch's AdamW, or its one-step-stale form."""
    if mode == "delayed":
        return StaleAdamW(params, lr=lr, warmup_steps=WARMUP)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.01, foreach=False)


def nearstep_optimizer(mode: str, params: Iterable[Any], lr: float, store: Path, model: nn.Module,
                       backend: str = "inline", slice_mb: float | None = SLICE_MB, **options: Any) -> torch.optim.Optimizer:
    import nearstep

    return nearstep.AdamW(params, lr=lr, weight_decay=0.01, store=store, mode=mode, model=model, device=backend,
                          slice_mb=slice_mb, warmup_steps=WARMUP, **options)


# ---------------------------------------------------------------------------
# Hugging Face models and data


VOCAB = 100
SEQ = 12
CLASSES = 5


def tiny_llama(seed: int = 0, **overrides: Any) -> nn.Module:
    """A two-layer LlamaForSequenceClassification, random init under ``seed``.

    ``initializer_range=0.2`` makes the first gradients' norm about 14, so the
    Trainer's default max_grad_norm=1.0 clips every step. No biases (see
    [Note: tolerances] for why not BERT).
    """
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                  intermediate_size=64, max_position_embeddings=64, initializer_range=0.2, num_labels=CLASSES,
                  pad_token_id=0)
    config.update(overrides)
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(LlamaConfig(**config))


class TokenData(torch.utils.data.Dataset):
    """Random token sequences (no padding token) with random labels."""

    def __init__(self, n: int, seed: int = 1, vocab: int = VOCAB) -> None:
        g = torch.Generator().manual_seed(seed)
        self.tokens = torch.randint(1, vocab, (n, SEQ), generator=g)
        self.labels = torch.randint(0, CLASSES, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[i], "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": self.labels[i]}


def trainer_args(output_dir: Path, **overrides: Any) -> Any:
    from transformers import TrainingArguments

    args = dict(output_dir=str(output_dir), max_steps=6, per_device_train_batch_size=4, use_cpu=True, report_to=[],
                save_strategy="no", logging_strategy="steps", logging_steps=1, seed=0, dataloader_num_workers=0,
                disable_tqdm=True)
    args.update(overrides)
    return TrainingArguments(**args)


# ---------------------------------------------------------------------------
# Models for hand-written loops


class PlistNet(nn.Module):
    """Weights held in an nn.ParameterList that only the parent's forward reads."""

    def __init__(self, vocab: int = 64, dim: int = 24, classes: int = 5) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.plist = nn.ParameterList([nn.Parameter(torch.randn(dim, dim) * 0.3) for _ in range(2)])
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens).mean(dim=1)
        for i in range(len(self.plist)):
            h = torch.tanh(h @ self.plist[i])
        return self.head(h)


class GrowNet(TinyNet):
    """TinyNet that may grow a residual adapter between its norm and its head."""

    def __init__(self) -> None:
        super().__init__()
        self.extra: nn.Module | None = None

    def grow(self, seed: int = 7) -> list[nn.Parameter]:
        torch.manual_seed(seed)
        self.extra = nn.Linear(48, 48)
        return list(self.extra.parameters())

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.norm(torch.relu(self.proj(self.embed(tokens).mean(dim=1))))
        if self.extra is not None:
            h = h + self.extra(h)
        return self.head(h)


def make_grownet(seed: int = 0) -> GrowNet:
    torch.manual_seed(seed)
    return GrowNet()


# ---------------------------------------------------------------------------
# The torch.compile subprocess

COMPILE_STEPS = 6
COMPILE_LR = 1e-2
COMPILE_CLIP = 0.5


def loop_run(model: nn.Module, opt: torch.optim.Optimizer, *, steps: int = 8, clip: float | None = None,
             after_step: Any = None) -> tuple[dict[str, torch.Tensor], list[float]]:
    """The README's loop; ``after_step(t, model, opt)`` runs after step t (1-based)."""
    losses = []
    for t, batch in enumerate(batches(steps), start=1):
        loss = loss_of(model, batch)
        loss.backward()
        losses.append(loss.item())
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()
        if after_step is not None:
            after_step(t, model, opt)
    finish(opt)
    return weights(model), losses


def train_loop(model: nn.Module, opt: torch.optim.Optimizer, *, clip: float | None) -> tuple[dict[str, torch.Tensor], list[float]]:
    return loop_run(model, opt, steps=COMPILE_STEPS, clip=clip)


def compile_run(mode: str, backend: str, store: Path, *, compiled: bool) -> dict[str, Any]:
    """nearstep (its own max_grad_norm) and the torch reference (clip_grad_norm_), same model, same data."""
    model = make_model()
    run_model = torch.compile(model) if compiled else model
    opt = nearstep_optimizer(mode, run_model.named_parameters(), COMPILE_LR, store, run_model, backend,
                             max_grad_norm=COMPILE_CLIP)
    ours, our_losses = train_loop(run_model, opt, clip=None)
    ref_model = make_model()
    ref_run_model = torch.compile(ref_model) if compiled else ref_model
    ref, ref_losses = train_loop(ref_run_model, reference_optimizer(mode, ref_run_model.parameters(), COMPILE_LR),
                                 clip=COMPILE_CLIP)
    return {"nearstep": ours, "nearstep_losses": our_losses, "torch": ref, "torch_losses": ref_losses}


def main(argv: list[str]) -> int:
    if len(argv) != 5 or argv[0] != "compile":
        print("usage: framework_models.py compile MODE BACKEND STORE OUT", file=sys.stderr)
        return 2
    _, mode, backend, store, out = argv
    # Inductor's CPU embedding backward adds with atomics: without this, torch's own compiled
    # runs differ between processes (seen: 7e-9 in embed.weight), and compiled overlap could
    # not be held to compiled sync bit for bit.
    torch.use_deterministic_algorithms(True)
    torch.save(compile_run(mode, backend, Path(store), compiled=True), out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
