"""The fused Adam pass of the native codecs ([Note: Adam in the codecs' pass] in native.c) against
its reference: the native codecs and torch's fused Adam kernel one after the other.

Every element it updates must get torch's bits (NaN payloads too), and a slice's file image
the bytes of the unfused pass, for every format, block size and piece layout, on fresh random
inputs; where torch's kernel rounds its last elements in a scalar loop, torch computes them.
"""

from __future__ import annotations

import math

import pytest
import torch

from nearstep import engine, rules
from nearstep.formats import FORMAT_NAMES, SliceCoder, StateFormat, encode_, native, views

pytestmark = pytest.mark.skipif(native.adam_lanes() == 0, reason=f"no fused Adam pass here: {native.status()}")

NAMES = ("master", "exp_avg", "exp_avg_sq")
# Blocks below, at and above the pass's piece (native.ADAM_PIECE): tiles of one piece holding
# many blocks, of two pieces (b1024) and of four (the default 2048).
FORMATS = [f for f in FORMAT_NAMES if not StateFormat.parse(f).is_identity] + ["bf16-sr+8bit-b32", "fp8-b64",
                                                                               "bf16-kahan+8bit-linear-b64",
                                                                               "bf16-sr+fp8-b1024"]
# (lr, beta1, beta2, eps, weight_decay, decoupled, step)
HYPERS = [(1e-3, 0.9, 0.999, 1e-8, 0.01, True, 1), (3e-2, 0.3, 0.95, 1e-6, 0.2, True, 9),
          (1e-3, 0.9, 0.999, 1e-8, 0.05, False, 1000), (1e-2, 0.6, 0.9, 1e-3, 0.0, False, 2),
          (5e-4, 0.99, 0.9999, 1e-8, 0.0, True, 40), (1e-2, 0.9, 0.99, 1e-8, 0.1, False, 3)]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32)


def torch_step(hyper, p, m, v, g):
    lr, beta1, beta2, eps, decay, decoupled, step = hyper
    fused = torch._fused_adamw_ if decoupled else torch._fused_adam_
    fused(p, [x.clone() for x in g], m, v, [], [torch.tensor(float(step)) for _ in p], lr=lr, beta1=beta1,
          beta2=beta2, weight_decay=decay, eps=eps, amsgrad=False, maximize=False)


def constants(hyper):
    lr, beta1, beta2, eps, decay, decoupled, step = hyper
    return native.adam_constants(lr, beta1, beta2, eps, decay, decoupled=decoupled, step=step)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("hyper", HYPERS)
def test_the_element_loop_is_torchs_vector_loop_bit_for_bit(hyper, threads):
    lanes = native.adam_lanes()
    n = 300 * lanes
    g = torch.Generator().manual_seed(hash(hyper) % 2**31)
    scale = 10.0 ** torch.randint(-20, 3, (n,), generator=g).float()
    p, grad = torch.randn(n, generator=g) * scale, torch.randn(n, generator=g) * scale
    m, v = torch.randn(n, generator=g) * scale * 0.1, torch.rand(n, generator=g) * scale * scale
    odd = torch.tensor([0x7FC00000, 0xFFC00001, 0x7F800000, 0xFF800000, 0x80000000, 0, 1, 0x7F7FFFFF],
                       dtype=torch.int64).to(torch.int32).view(torch.float32)
    for t in (p, grad, m, v):
        t[torch.randperm(n, generator=g)[:8]] = odd
    ref = [p.clone(), m.clone(), v.clone()]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch_step(hyper, [ref[0]], [ref[1]], [ref[2]], [grad])
    finally:
        torch.set_num_threads(before)
    c, flags = constants(hyper)
    native._library().ns_adam_elements(p.data_ptr(), m.data_ptr(), v.data_ptr(), grad.data_ptr(), n, c, flags)
    for ours, theirs in zip((p, m, v), ref):
        assert torch.equal(bits(ours), bits(theirs))


def image_of(fmt: StateFormat, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    values = {"master": torch.randn(n, generator=g), "exp_avg": torch.randn(n, generator=g) * 1e-3,
              "exp_avg_sq": torch.rand(n, generator=g) * 1e-6}
    values["exp_avg"][: 2 * fmt.block] = 0.0  # a fresh state's first steps
    image = torch.zeros(fmt.file_bytes(NAMES, n), dtype=torch.uint8)
    encode_(fmt, values, NAMES, views(fmt, image, NAMES, n), seed)
    return image


def unfused(fmt, image, n, pieces, grads, hyper, seed):
    """The reference: decode each piece's span, torch's kernel on the piece, encode the span."""
    work = [torch.zeros(n) for _ in NAMES]
    with native.unfused():
        coder = SliceCoder(fmt, views(fmt, image, NAMES, n), NAMES, work, n)
    assert coder.adam is None
    for j, lo, hi in pieces:
        a, b = coder.span(lo, hi)
        coder.decode(a, b)
        torch_step(hyper, [work[0][lo:hi]], [work[1][lo:hi]], [work[2][lo:hi]], [grads[j][: hi - lo]])
        coder.encode_(a, b, seed)


def fused(fmt, image, n, pieces, grads, hyper, seed):
    """The engine's way: engine.fused_pass, and torch's kernel for what it leaves."""
    work = [torch.zeros(n) for _ in NAMES]
    coder = SliceCoder(fmt, views(fmt, image, NAMES, n), NAMES, work, n)
    assert coder.adam is not None
    # whole blocks per tile, at least one piece; pieces of ADAM_PIECE within it
    assert coder.adam.tile == max(fmt.block if fmt.block_aligned else 1, native.ADAM_PIECE)
    assert coder.adam.piece == native.ADAM_PIECE and coder.adam.tile <= native.ADAM_TILE
    c, flags = constants(hyper)
    entries = {j: (grads[j].data_ptr(), c, flags) for j, _lo, _hi in pieces}  # each piece is a whole segment
    bounds = [(lo, hi) for _j, lo, hi in pieces]
    reports = []
    rest = engine.fused_pass(coder, entries, native.adam_lanes(), bounds, pieces, seed,
                             torch.empty(3 * native.ADAM_TILE), reports)
    assert len(reports) + sum(1 for r in rest if r[1] == bounds[r[0]][0]) == len(pieces)
    for j, lo, hi in rest:
        a, b = coder.span(lo, hi)
        coder.decode(a, b)
        first = bounds[j][0]
        torch_step(hyper, [work[0][lo:hi]], [work[1][lo:hi]], [work[2][lo:hi]], [grads[j][lo - first : hi - first]])
        coder.encode_(a, b, seed)
    return rest


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_fused_pass_writes_the_bytes_of_the_codecs_and_torchs_kernel(fmt):
    """Random piece layouts (segments on blocks, lengths with and without a scalar tail, several
    tiles, the file's end): the image after the fused pass equals the unfused one byte for byte."""
    fmt = StateFormat.parse(fmt)
    block = fmt.block if fmt.block_aligned else 1
    lanes = native.adam_lanes()
    g = torch.Generator().manual_seed(len(fmt.name))
    for trial, hyper in enumerate(HYPERS[:3]):
        lengths = [int(x) for x in torch.randint(1, 3 * native.ADAM_TILE + 40, (5,), generator=g)]
        lengths += [lanes * 7, 5, native.ADAM_TILE]
        pieces, at = [], 0
        for j, length in enumerate(lengths):
            pieces.append((j, at, at + length))
            at = -(-(at + length) // block) * block  # the next segment starts on a block
        n = pieces[-1][2]
        grads = [torch.randn(hi - lo, generator=g) * 1e-2 for _j, lo, hi in pieces]
        image = image_of(fmt, n, trial)
        expected = image.clone()
        unfused(fmt, expected, n, pieces, grads, hyper, seed=99 + trial)
        rest = fused(fmt, image, n, pieces, grads, hyper, seed=99 + trial)
        assert any(hi - lo < (lengths[j]) for j, lo, hi in rest) or all((hi - lo) % lanes == 0 for _j, lo, hi in pieces)
        assert torch.equal(image, expected), (fmt.name, hyper)


def test_a_torch_that_computes_otherwise_turns_the_pass_off(monkeypatch):
    """The first use checks the element loop against this torch; a kernel that differs (here, one
    that rounds the update once more) leaves the pass out, and says so."""
    real = torch._fused_adamw_

    def other(params, *args, **kwargs):
        real(params, *args, **kwargs)
        for p in params:
            p.mul_(1.0 + 2.0 ** -20)

    monkeypatch.setattr(torch, "_fused_adamw_", other)
    monkeypatch.setitem(native._state, "lanes", None)
    del native._state["lanes"]
    try:
        assert native.adam_lanes() == 0
        assert "differs" in native._state["adam_why"]
    finally:
        native._state.pop("lanes", None)
    monkeypatch.setattr(torch, "_fused_adamw_", real)
    assert native.adam_lanes() > 0


def test_the_constants_are_torchs_casts():
    """adam_constants: the float32 casts of the doubles torch's kernel computes."""
    c, flags = native.adam_constants(1e-3, 0.9, 0.999, 1e-8, 0.01, decoupled=True, step=10)
    f32 = lambda x: torch.tensor(x, dtype=torch.float32).item()  # noqa: E731
    bias1, bias2 = 1 - 0.9 ** 10.0, 1 - 0.999 ** 10.0
    assert list(c) == [f32(1 - 1e-3 * 0.01), f32(0.01), f32(f32(0.1)), f32(0.999), f32(1 - 0.999),
                       f32(math.sqrt(bias2)), f32(1e-8), f32(-(1e-3 / bias1))]
    assert flags == 1 | 4  # decoupled decay, the small lerp weight
    _c, flags = native.adam_constants(1e-3, 0.2, 0.999, 1e-8, 0.1, decoupled=False, step=1)
    assert flags == 2  # L2 decay; 1 - beta1 = 0.8 is not small
    assert engine.fusable([1], rules.Guards(spike_clip=1.0), [(rules.AdamWHyper(lr=1e-3), [0], [torch.zeros(4)])]) == {}
    assert engine.fusable([1], rules.Guards(), [(rules.SGDHyper(lr=1e-3), [0], [torch.zeros(4)])]) == {}
    assert engine.fusable([1], rules.Guards(), [(rules.AdamWHyper(lr=1e-3, maximize=True), [0], [torch.zeros(4)])]) == {}
    assert list(engine.fusable([1, 1], rules.Guards(), [(rules.AdamHyper(lr=1e-3), [0, 1], [torch.zeros(4)] * 2)],
                               adopted={1})) == [0]
