"""The native codecs (nearstep.formats.native) against the torch codecs, their reference.

Every byte each writes and every value each decodes must be equal, on fresh random
inputs of several magnitudes, on special values, for every block size and for
windows of a file ([Note: why the codecs have a native pass]).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from nearstep import formats
from nearstep.formats import FORMAT_NAMES, SliceCoder, StateFormat, decode_, encode_, native, views, window
from nearstep.formats.maps import _signed_encode_lut

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native codecs unavailable: {native.status()}")

NAMES = ("master", "exp_avg", "exp_avg_sq")
# Every format the native pass serves (fp32 parts are copies either way).
NATIVE_FORMATS = list(FORMAT_NAMES) + ["8bit-b32", "bf16-sr+8bit-linear-b64", "bf16-kahan+8bit-b65536", "fp8-b32"]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def from_bits(patterns: list[int]) -> torch.Tensor:
    return torch.tensor(patterns, dtype=torch.int64).to(torch.int32).view(torch.float32)


def state(numel: int, seed: int, specials: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    scale = 10.0 ** torch.randint(-30, 4, (numel,), generator=g).float()
    values = {
        "master": torch.randn(numel, generator=g) * scale,
        "exp_avg": torch.randn(numel, generator=g) * scale * 1e-3,
        "exp_avg_sq": torch.rand(numel, generator=g) ** 4 * scale * 1e-6,
    }
    if specials:
        odd = from_bits([0x7FC00000, 0xFFC00000, 0x7F800001, 0x7F800000, 0xFF800000, 0x00000001, 0x80000001,
                         0x007FFFFF, 0x7F7FFFFF, 0xFF7FFFFF, 0x80000000, 0x00000000, 0x7F7F8000, 0x3F808000])
        for k, name in enumerate(NAMES):
            at = torch.randperm(numel, generator=g)[: len(odd)]
            values[name][at] = odd.roll(k)[: at.numel()]
        values["exp_avg"][: min(numel, 64)] = 0.0  # an all-zero block (for small blocks)
        values["exp_avg_sq"][-5:] = -1e-3  # negative second moments become +0.0
    return values


def encode_both(fmt: StateFormat, values: dict[str, torch.Tensor], numel: int, seed: int, decode_moments: bool):
    out = []
    for use_native in (True, False):
        image = torch.zeros(fmt.file_bytes(NAMES, numel), dtype=torch.uint8)
        regions = views(fmt, image, NAMES, numel)
        work = {k: v.clone() for k, v in values.items()}
        decoded = {k: torch.full((numel,), 7.0) for k in NAMES}
        if use_native:
            encode_(fmt, work, NAMES, regions, seed, decode_moments=decode_moments)
            decode_(fmt, regions, NAMES, decoded)
        else:
            with native.disabled():
                encode_(fmt, work, NAMES, regions, seed, decode_moments=decode_moments)
                decode_(fmt, regions, NAMES, decoded)
        out.append((image, work, decoded))
    return out


@pytest.mark.parametrize("name", NATIVE_FORMATS)
@pytest.mark.parametrize("specials", [False, True], ids=["random", "specials"])
def test_native_equals_torch_bit_for_bit(name, specials):
    fmt = StateFormat.parse(name)
    for numel, seed in ((5 * 2048 + 77, 0), (3 * 65536 + 1, 1), (1, 2), (31, 3)):
        for decode_moments in (True, False):
            values = state(numel, seed, specials)
            (image_a, work_a, dec_a), (image_b, work_b, dec_b) = encode_both(fmt, values, numel, 99 + seed,
                                                                               decode_moments)
            assert torch.equal(image_a, image_b), (name, numel)
            for k in NAMES:
                assert torch.equal(bits(work_a[k]), bits(work_b[k])), (name, numel, k, "encoded values")
                assert torch.equal(bits(dec_a[k]), bits(dec_b[k])), (name, numel, k, "decoded values")


def test_signed_dynamic_codes_without_the_table_agree_with_it_on_every_entry():
    """[Note: the signed code without the table]: every 12-bit index of maps.py's table, with
    random low bits and the low bits that carry, through the vectorised native encoder."""
    g = torch.Generator().manual_seed(5)
    patterns = []
    for index in range(4096):
        sign, exponent, mantissa = index >> 11, (index >> 3) & 0xFF, index & 7
        if exponent > 126:  # above 1.0 would raise the block's maximum
            continue
        base = sign << 31 | exponent << 23 | mantissa << 20
        for low in (0, (1 << 19) - 1, 1 << 19, (1 << 20) - 1, int(torch.randint(0, 1 << 20, (1,), generator=g))):
            patterns.append(base | low)
    xs = from_bits(patterns)
    pad = (-len(patterns) - 1) % 2048
    values = torch.cat([torch.ones(1), xs, torch.zeros(pad)])  # each block's maximum is 1.0 (scale 1)
    values[::2048] = 1.0
    codec = StateFormat.parse("8bit").moment_codec
    got = {}
    for use_native in (True, False):
        codes = torch.zeros(values.numel(), dtype=torch.uint8)
        scales = torch.zeros(values.numel() // 2048)
        regions = {"exp_avg": codes, "exp_avg.scale": scales}
        if use_native:
            assert native.encode_(codec, "exp_avg", values.clone(), regions, write_back=False)
        else:
            codec.encode_("exp_avg", values.clone(), regions, formats.Workspace(), write_back=False)
        assert torch.all(scales == 1.0)
        got[use_native] = codes
    assert torch.equal(got[True], got[False])
    # and the table itself, for the magnitudes that fit below 1.0
    table = _signed_encode_lut()
    index = (((bits(values).to(torch.int64) & 0xFFFFFFFF) + (1 << 19)) >> 20) & 0xFFF
    assert torch.equal(got[True], table[index])


@pytest.mark.parametrize("name", ["bf16-sr+8bit-b32", "bf16-kahan+8bit-linear-b64", "bf16-sr", "8bit"])
def test_windows_encode_as_the_whole_file(name):
    """SliceCoder (the device's pass) over block-aligned windows equals encode_/decode_ over the file."""
    fmt = StateFormat.parse(name)
    numel = 4 * 65536 + 3 * 64 + 5
    values = state(numel, 7, specials=False)
    whole = torch.zeros(fmt.file_bytes(NAMES, numel), dtype=torch.uint8)
    reference = {k: v.clone() for k, v in values.items()}
    encode_(fmt, reference, NAMES, views(fmt, whole, NAMES, numel), 1234, decode_moments=False)
    # The coder decodes what the file holds, so start from the encoded file.
    image = whole.clone()
    work = [torch.zeros(numel) for _ in NAMES]
    coder = SliceCoder(fmt, views(fmt, image, NAMES, numel), NAMES, work, numel)
    block = fmt.block if fmt.block_aligned else 1
    cuts = sorted({0, numel, *(c - c % block for c in (3 * 64, 65536, 65536 + 64 * 7, 3 * 65536 + 1))})
    assert coder.span(block + 1, 2 * block + 1) == ((block + 1) if block == 1 else block, min(3 * block, numel))
    for lo, hi in zip(cuts, cuts[1:]):
        coder.decode(lo, hi)
    for k, name_ in enumerate(NAMES):
        expected = torch.empty(numel)
        decode_(fmt, views(fmt, whole, NAMES, numel), NAMES, {n: (expected if n == name_ else torch.empty(numel))
                                                              for n in NAMES})
        assert torch.equal(bits(work[k]), bits(expected))
    # Re-encode the original values window by window: the bytes of one whole-file encode.
    for k, name_ in enumerate(NAMES):
        work[k].copy_(values[name_])
    for lo, hi in zip(cuts, cuts[1:]):
        coder.encode_(lo, hi, 1234)
    assert torch.equal(image, whole)
    assert torch.equal(bits(work[0]), bits(reference["master"]))
    # window() is the same cut, checked
    win = window(fmt, views(fmt, image, NAMES, numel), NAMES, numel, cuts[1], cuts[2])
    assert all(t.numel() > 0 for t in win.values())
    if block > 1:
        with pytest.raises(ValueError, match="blocks"):
            window(fmt, views(fmt, image, NAMES, numel), NAMES, numel, 1, cuts[2])


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


PROBE = """
    import warnings, torch
    warnings.simplefilter("always")
    from nearstep.formats import StateFormat, views, encode_, native
    fmt, names, n = StateFormat.parse("bf16-sr+8bit"), ("master", "exp_avg", "exp_avg_sq"), 5000
    g = torch.Generator().manual_seed(3)
    image = torch.zeros(fmt.file_bytes(names, n), dtype=torch.uint8)
    encode_(fmt, {k: torch.randn(n, generator=g) for k in names}, names, views(fmt, image, names, n), 7)
    print(native.available(), native.status())
    print(image.sum().item(), image.double().mul(torch.arange(image.numel(), dtype=torch.float64)).sum().item())
"""


def test_without_a_compiler_the_torch_codecs_run_with_the_same_bytes(tmp_path):
    built = run_python(PROBE, NEARSTEP_CACHE=str(tmp_path / "a"))
    off = run_python(PROBE, NEARSTEP_NATIVE="0", NEARSTEP_CACHE=str(tmp_path / "b"))
    broken = run_python(PROBE, CC=str(tmp_path / "no-such-cc"), PATH="/nonexistent",
                        NEARSTEP_CACHE=str(tmp_path / "c"))
    for done in (built, off, broken):
        assert done.returncode == 0, done.stderr
    assert built.stdout.startswith("True native")
    assert off.stdout.startswith("False off (NEARSTEP_NATIVE=0)") and "RuntimeWarning" not in off.stderr
    assert broken.stdout.startswith("False ") and "the torch codecs run" in broken.stdout
    assert "RuntimeWarning" in broken.stderr and "slower" in broken.stderr  # said once, loudly
    # the same bytes whichever ran
    assert built.stdout.splitlines()[1] == off.stdout.splitlines()[1] == broken.stdout.splitlines()[1]
    assert list((tmp_path / "a" / "native").glob("codecs-*.so"))  # built into the cache
    assert not list((tmp_path / "a" / "native").glob(".build-*"))  # no half-written file left


NARROW = """
    import sys
    from nearstep.formats import native
    native._FLAGS = native._FLAGS + ("-mno-avx512f",)  # the AVX2 loops, as a machine without AVX-512 builds them
    sys.path.insert(0, sys.argv[1])
    import test_native as t
    assert native.available(), native.status()
    for name in ("8bit-b32", "bf16-sr+8bit", "fp8", "16bit", "bf16-kahan+8bit-linear-b64"):
        fmt = t.StateFormat.parse(name)
        for numel, seed in ((5 * 2048 + 77, 0), (31, 3)):
            for specials in (False, True):
                (a, wa, da), (b, wb, db) = t.encode_both(fmt, t.state(numel, seed, specials), numel, 99 + seed, True)
                assert t.torch.equal(a, b), name
                assert all(t.torch.equal(t.bits(da[k]), t.bits(db[k])) for k in t.NAMES), name
    print("ok")
"""


@pytest.mark.skipif("avx512f" not in Path("/proc/cpuinfo").read_text(errors="replace") if Path("/proc/cpuinfo").exists()
                    else True, reason="no AVX-512 here: the default build already is the AVX2 one")
def test_the_avx2_loops_equal_torch_where_the_machine_has_avx512(tmp_path):
    """[Note: codecs on 16 lanes]: on an AVX-512 machine the default build takes the 16-lane loops;
    the 8-lane ones that machines without AVX-512 run are built here and checked too."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(NARROW), str(Path(__file__).parent)],
                          capture_output=True, text=True, env={**os.environ, "NEARSTEP_CACHE": str(tmp_path)},
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.parametrize("name", ["exp_avg", "exp_avg_sq"], ids=["e4m3", "e5m2"])
def test_fp8_rounding_agrees_with_torch_at_every_tie(name):
    """Every fp8 code's value, every midpoint between neighbours and one ulp either side, as the
    scaled values of blocks whose maximum is exactly NORM (so the scale is 1)."""
    dtype, norm = (torch.float8_e4m3fn, 256.0) if name == "exp_avg" else (torch.float8_e5m2, 32768.0)
    values = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).float()
    values = values[torch.isfinite(values) & (values.abs() <= norm) & (values >= 0)].unique().sort().values
    mids = (values[1:] + values[:-1]) / 2  # exact in fp32
    ulp_up, ulp_down = torch.nextafter(mids, torch.tensor(1e30)), torch.nextafter(mids, torch.tensor(-1e30))
    ys = torch.cat([values, mids, ulp_up, ulp_down, values / 3, torch.tensor([2.0**-20, 2.0**-30, 1e-38])])
    ys = torch.cat([ys, -ys]) if name == "exp_avg" else ys.clamp_min(0)
    block = 64
    pad = (-ys.numel()) % (block - 1)
    ys = torch.cat([ys, torch.zeros(pad)]).view(-1, block - 1)
    blocks = torch.cat([torch.full((ys.shape[0], 1), norm), ys], dim=1).flatten()  # each block scaled by 1
    codec = StateFormat.parse(f"fp8-b{block}").moment_codec
    got = {}
    for use_native in (True, False):
        codes = torch.zeros(blocks.numel(), dtype=torch.uint8)
        regions = {name: codes, name + ".scale": torch.zeros(blocks.numel() // block)}
        if use_native:
            assert native.encode_(codec, name, blocks.clone(), regions, write_back=False)
        else:
            codec.encode_(name, blocks.clone(), regions, formats.Workspace(), write_back=False)
        assert torch.all(regions[name + ".scale"] == norm)  # the block maximum is the scale
        got[use_native] = codes
    assert torch.equal(got[True], got[False])


@pytest.mark.parametrize("name", ["16bit", "fp8-b32", "8bit-b32", "8bit-linear-b32"])
def test_every_code_decodes_as_torch_decodes_it(name):
    """All 256 byte values in every code position (fp8's nan and inf codes, never written, too),
    with scales of several magnitudes, a nan and an inf."""
    fmt = StateFormat.parse(name)
    g = torch.Generator().manual_seed(11)
    numel = 32 * 256
    for state in ("exp_avg", "exp_avg_sq"):
        image = torch.zeros(fmt.file_bytes([state], numel), dtype=torch.uint8)
        regions = views(fmt, image, [state], numel)
        codes = regions[state].view(torch.uint8)
        size = codes.numel()  # 16bit: two bytes per element, so random bf16 patterns
        codes.copy_(torch.arange(size, dtype=torch.int64).remainder(256).to(torch.uint8)[torch.randperm(size, generator=g)])
        if state + ".scale" in regions:
            scales = regions[state + ".scale"]
            scales.copy_(10.0 ** torch.randint(-30, 30, scales.shape, generator=g).float())
            scales[:2] = torch.tensor([float("nan"), float("inf")])
        got = {}
        for use_native in (True, False):
            out = torch.empty(numel)
            with contextlib.nullcontext() if use_native else native.disabled():
                decode_(fmt, regions, [state], {state: out})
            got[use_native] = bits(out)
        assert torch.equal(got[True], got[False]), (name, state)
