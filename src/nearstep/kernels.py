"""The functions a device runs: one optimizer step over flat fp32 segments, plus the guards.

A segment is a 1-D contiguous float32 view into the flat buffers the device reads
from the store: the master weights, one region per optimizer state (see
:func:`state_names`) and a scratch copy of the gradient. :func:`update_` applies
one step in place to every segment of one param group and reports, per segment,
what the guards did.

The math is torch's own: AdamW, Adam and SGD call the fused CPU kernels
(``torch._fused_adamw_``, ``torch._fused_adam_``, ``torch._fused_sgd_``) that
``torch.optim`` uses with ``fused=True``, so ``sync`` mode matches ``torch.optim``.
Lion has no fused kernel and runs on ``torch._foreach_*`` ops.

The hyperparameters and guards they take are the protocol's vocabulary
(:mod:`nearstep.rules`): the host builds them, the device runs them here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .rules import UNWATCHED, AdamHyper, AdamWHyper, Guards, Hyper, LionHyper, SegmentReport, SGDHyper, state_names

__all__ = ["flat_views", "update_"]


def flat_views(buf: Tensor, numels: Sequence[int]) -> list[Tensor]:
    """Consecutive 1-D views of the contiguous 1-D tensor ``buf``, of the given sizes."""
    if buf.dim() != 1 or not buf.is_contiguous():
        raise ValueError(f"flat_views needs a contiguous 1-D tensor, got shape {tuple(buf.shape)}")
    if any(n < 0 for n in numels):
        raise ValueError(f"numels must be >= 0, got {list(numels)}")
    if sum(numels) > buf.numel():
        raise ValueError(f"numels sum to {sum(numels)}, but the buffer holds only {buf.numel()} elements")
    views, offset = [], 0
    for n in numels:
        views.append(buf.narrow(0, offset, n))
        offset += n
    return views


def update_(
    hyper: Hyper,
    masters: list[Tensor],
    states: dict[str, list[Tensor]],
    grads: list[Tensor],
    steps: list[int],
    guards: Guards,
) -> list[SegmentReport]:
    """Apply one optimizer step, in place, to the segments of one param group.

    Every tensor is a 1-D contiguous float32 CPU tensor, usually a view into a
    larger flat buffer; the master weights and states are updated in place and
    never reallocated. Segment ``i`` is ``masters[i]``, ``states[name][i]`` and
    ``grads[i]``, all of the same size.

    Args:
        hyper: the optimizer and its hyperparameters for this step.
        masters: fp32 master weights, one per segment.
        states: for each name in ``state_names(type(hyper))``, one tensor per segment.
            SGD's momentum buffer is overwritten on a segment's first step and left
            untouched when momentum is 0.
        grads: gradients, one per segment. Scratch: the guards overwrite them (with
            the clipped gradient, then with the update), so their content afterwards is
            unspecified.
        steps: each segment's step number after increment (1 on its first update);
            Adam's bias correction uses it per segment.
        guards: the guards to apply; ``guards.skip_nonfinite`` is the host's business.

    Returns:
        One :class:`SegmentReport` per segment, in order.

    Raises:
        ValueError: the lists disagree in length or size, a step is < 1, a state
            region is missing, or a guard does not fit the optimizer.
    """
    kind = type(hyper)
    names = state_names(kind)
    guards.check_for(kind)
    _check_segments(names, masters, states, grads, steps)
    if not masters:
        return []  # the fused ops cannot dispatch on empty lists

    spike_on = guards.spike_clip is not None and any(step > guards.spike_warmup for step in steps)
    watching = guards.telemetry or guards.update_clip is not None
    if not (spike_on or watching):
        _step_(hyper, masters, states, grads, steps)
        return [UNWATCHED] * len(masters)
    return _guarded_step_(hyper, masters, states, grads, steps, guards, spike_on, watching)



# [Note: guards work in blocks]
# The guards need temporaries (the old weights, the spike bound) and extra passes
# over the data. Done segment-wide they would allocate and fault in fresh pages
# the size of the segment on every step and stream each tensor from memory
# several times. Instead, segments are cut into pieces of at most _BLOCK elements,
# and pieces are grouped into batches of at most _BLOCK elements (so small
# segments share one fused call); each batch is clipped, snapshotted, stepped and
# measured while it sits in cache, with scratch buffers allocated once per call.
# The update itself is elementwise, so blocking does not change any number.
_BLOCK = 1 << 17  # 512 KiB per fp32 piece: measured best of 2**14..2**20 on one core


def _batches(numels: list[int]) -> list[list[tuple[int, int, int]]]:
    """(segment, start, stop) pieces of at most _BLOCK elements, grouped into batches of at most _BLOCK."""
    batches, batch, filled = [], [], 0
    for i, numel in enumerate(numels):
        for start in range(0, numel, _BLOCK):
            stop = min(start + _BLOCK, numel)
            if filled + stop - start > _BLOCK:
                batches.append(batch)
                batch, filled = [], 0
            batch.append((i, start, stop))
            filled += stop - start
    if batch:
        batches.append(batch)
    return batches


def _guarded_step_(
    hyper: Hyper, masters: list[Tensor], states: dict[str, list[Tensor]], grads: list[Tensor], steps: list[int],
    guards: Guards, spike_on: bool, watching: bool,
) -> list[SegmentReport]:
    numels = [m.numel() for m in masters]
    piece_size, batch_size = min(_BLOCK, max(numels)), min(_BLOCK, sum(numels))
    spike_scratch = (torch.empty(piece_size), torch.empty(piece_size)) if spike_on else ()
    old_scratch = torch.empty(batch_size) if watching else None
    keep_update = guards.update_clip is not None
    spiked = [0] * len(masters)
    old_sq = [0.0] * len(masters)
    update_sq = [0.0] * len(masters)

    for batch in _batches(numels):
        index = [i for i, _, _ in batch]
        piece_masters = [masters[i][start:stop] for i, start, stop in batch]
        piece_grads = [grads[i][start:stop] for i, start, stop in batch]
        piece_states = {name: [states[name][i][start:stop] for i, start, stop in batch] for name in states}
        if spike_on:
            for i, grad, exp_avg_sq in zip(index, piece_grads, piece_states["exp_avg_sq"]):
                if steps[i] > guards.spike_warmup and steps[i] > 1:  # at step 1 there is no history
                    # [Note: spike bound] v is an average that starts at zero: before step t it
                    # holds (1 - beta2**(t-1)) of E[g^2]. Without Adam's bias correction the bound
                    # would sit far below one standard deviation for thousands of steps and clip
                    # ordinary gradients (a third of them at step 50 with beta2 = 0.999).
                    theta = guards.spike_clip / math.sqrt(1.0 - hyper.beta2 ** (steps[i] - 1))
                    spiked[i] += _spike_clip_piece_(grad, exp_avg_sq, theta, *spike_scratch)
        if old_scratch is not None:
            olds = flat_views(old_scratch, [stop - start for _, start, stop in batch])
            torch._foreach_copy_(olds, piece_masters)
            old_norms = torch._foreach_norm(olds)
        _step_(hyper, piece_masters, piece_states, piece_grads, [steps[i] for i in index])
        if old_scratch is not None:
            torch._foreach_sub_(olds, piece_masters)  # old - new: minus the update
            update_norms = torch._foreach_norm(olds)
            if keep_update:
                # The gradient is spent; its storage keeps (minus) the update until the
                # whole segment's RMS is known.
                torch._foreach_copy_(piece_grads, olds)
            for i, old_norm, update_norm in zip(
                index, torch.stack(old_norms).tolist(), torch.stack(update_norms).tolist()
            ):
                old_sq[i] += old_norm * old_norm
                update_sq[i] += update_norm * update_norm

    if not watching:
        return [SegmentReport(count, math.nan, math.nan, False) for count in spiked]
    reports = []
    for i, numel in enumerate(numels):
        rms = math.sqrt(update_sq[i] / numel) if numel else 0.0
        ratio = math.sqrt(update_sq[i] / old_sq[i]) if old_sq[i] > 0 else 0.0
        clipped = keep_update and rms > guards.update_clip
        if clipped:
            scale = guards.update_clip / rms
            # new + (1 - scale) * (old - new) == old + scale * update
            masters[i].add_(grads[i], alpha=1.0 - scale)
            rms, ratio = guards.update_clip, ratio * scale  # report what was applied
        reports.append(SegmentReport(spiked[i], rms, ratio, clipped))
    return reports


def _spike_clip_piece_(grad: Tensor, exp_avg_sq: Tensor, theta: float, bound: Tensor, work: Tensor) -> int:
    """Clip gradient spikes in place against the second moment; return how many were clipped."""
    # Float ops only: comparisons, masks and torch.where run several times slower on CPU.
    numel = grad.numel()
    bound, work = bound[:numel], work[:numel]
    torch.sqrt(exp_avg_sq, out=bound).mul_(theta)
    # v == 0: no history for this element. Clipping it to 0 would keep v at 0 and
    # freeze the element for good, so its bound becomes +inf (0/0 -> nan -> inf).
    torch.div(bound, bound, out=work)
    bound.mul_(work).nan_to_num_(nan=math.inf, posinf=math.inf)
    torch.abs(grad, out=work)
    torch.minimum(work, bound, out=bound)  # the clipped magnitude; a nan gradient stays nan
    # |g| - min(|g|, bound) is > 0 exactly where |g| > bound; the sum of signs is exact
    # in fp32 because a piece holds at most _BLOCK < 2**24 elements.
    count = int(work.sub_(bound).nan_to_num_(nan=0.0).sign_().sum())
    if count:
        torch.copysign(bound, grad, out=grad)  # unclipped elements get their own value back
    return count


def _check_segments(
    names: tuple[str, ...], masters: list[Tensor], states: dict[str, list[Tensor]], grads: list[Tensor],
    steps: list[int],
) -> None:
    if set(states) != set(names):
        raise ValueError(f"states must hold exactly the regions {list(names)}, got {sorted(states)}")
    count = len(masters)
    lengths = {"grads": len(grads), "steps": len(steps)} | {name: len(states[name]) for name in names}
    for what, length in lengths.items():
        if length != count:
            raise ValueError(f"{what} has {length} segments but masters has {count}")
    for i, master in enumerate(masters):
        numel = master.numel()
        others = [grads[i]] + [states[name][i] for name in names]
        if any(t.numel() != numel for t in others):
            sizes = [t.numel() for t in others]
            raise ValueError(f"segment {i}: master has {numel} elements but grad/states have {sizes}")
        if steps[i] < 1:
            raise ValueError(f"segment {i}: steps are counted from 1 (after increment), got {steps[i]}")


def _step_(
    hyper: Hyper, masters: list[Tensor], states: dict[str, list[Tensor]], grads: list[Tensor], steps: list[int]
) -> None:
    match hyper:
        case AdamWHyper() | AdamHyper():
            _adam_step_(hyper, masters, states["exp_avg"], states["exp_avg_sq"], grads, steps)
        case SGDHyper():
            _sgd_step_(hyper, masters, states["momentum_buffer"], grads, steps)
        case LionHyper():
            _lion_step_(hyper, masters, states["exp_avg"], grads)


def _adam_step_(
    hyper: AdamWHyper | AdamHyper, masters: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
    grads: list[Tensor], steps: list[int],
) -> None:
    fused = torch._fused_adamw_ if isinstance(hyper, AdamWHyper) else torch._fused_adam_
    # The fused kernel reads each tensor's own step (a float32 scalar, as torch.optim
    # keeps it), so segments at different steps still share one call.
    state_steps = [_step_tensor(step) for step in steps]
    fused(
        masters, grads, exp_avgs, exp_avg_sqs, [], state_steps,  # []: no max_exp_avg_sqs, no amsgrad
        lr=hyper.lr, beta1=hyper.beta1, beta2=hyper.beta2, weight_decay=hyper.weight_decay, eps=hyper.eps,
        amsgrad=False, maximize=hyper.maximize, grad_scale=None, found_inf=None,
    )


_STEP_TENSORS: dict[int, Tensor] = {}


def _step_tensor(step: int) -> Tensor:
    """A float32 scalar holding ``step``, shared by every call at that step.

    Why shared: the device's pass calls the kernel once per chunk, and making the
    scalars afresh (``torch.tensor(steps).unbind()``) cost 11 of the 34 us a call
    took on one core. The fused kernels only read them (torch.optim increments its
    own step tensors before the call), and nothing else sees these.
    """
    tensor = _STEP_TENSORS.get(step)
    if tensor is None:
        if len(_STEP_TENSORS) >= 4096:
            _STEP_TENSORS.clear()
        tensor = _STEP_TENSORS[step] = torch.tensor(float(step), dtype=torch.float32)
    return tensor


def _sgd_step_(
    hyper: SGDHyper, masters: list[Tensor], buffers: list[Tensor], grads: list[Tensor], steps: list[int]
) -> None:
    decay = hyper.weight_decay
    if hyper.decoupled_weight_decay:
        if decay != 0:
            torch._foreach_mul_(masters, 1.0 - hyper.lr * decay)
        decay = 0.0
    options = dict(
        weight_decay=decay, momentum=hyper.momentum, lr=hyper.lr, dampening=hyper.dampening,
        nesterov=hyper.nesterov, maximize=hyper.maximize,
    )
    if hyper.momentum == 0:
        torch._fused_sgd_(masters, grads, [], is_first_step=False, **options)
        return
    # is_first_step (buffer := decayed gradient, as torch.optim.SGD does on a fresh
    # state) is one flag per call, so first-step segments get their own call.
    first = [i for i, step in enumerate(steps) if step == 1]
    if len(first) in (0, len(steps)):
        torch._fused_sgd_(masters, grads, buffers, is_first_step=bool(first), **options)
        return
    later = [i for i, step in enumerate(steps) if step != 1]
    for indices, is_first_step in ((first, True), (later, False)):
        lists = ([tensors[i] for i in indices] for tensors in (masters, grads, buffers))
        torch._fused_sgd_(*lists, is_first_step=is_first_step, **options)


def _lion_step_(hyper: LionHyper, masters: list[Tensor], exp_avgs: list[Tensor], grads: list[Tensor]) -> None:
    if hyper.maximize:
        torch._foreach_neg_(grads)
    # The direction interpolates with beta1 but the momentum keeps beta2, so the
    # direction needs its own buffer: both read the old momentum.
    directions = torch._foreach_lerp(exp_avgs, grads, 1.0 - hyper.beta1)
    torch._foreach_sign_(directions)
    if hyper.weight_decay != 0:
        torch._foreach_mul_(masters, 1.0 - hyper.lr * hyper.weight_decay)
    torch._foreach_add_(masters, directions, alpha=-hyper.lr)
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - hyper.beta2)
