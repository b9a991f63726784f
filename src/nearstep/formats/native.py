"""Native codecs: each codec's decode or encode of a range as one C loop, built on first use.

[Note: why the codecs have a native pass]
Measured on one core of the development VM (``nearstep bench codecs``, 4M
elements, AdamW state), the torch codecs spend ~2.8 ns per element decoding and
~7 ns encoding ``bf16-sr+8bit``, against ~0.9 ns for the fused AdamW kernel
itself: each of their ~10 vectorised torch ops is a pass over the chunk with
its own dispatch. One C loop per range does the same arithmetic in one pass
while the values are in registers. ``torch.compile`` was tried first: inductor
vectorises the float part, but turns every bit cast and ``isnan`` into a
scalar loop through a stack array, and its encode of the 8-bit signed map ran
at 4.5 ns per element against eager's 2.7; its C++ build also needs a compiler
at run time, as this does. So the loops are written here, in C, for the
compiler the machine has (``cc``, ``-O3 -march=native``), and loaded with
:mod:`ctypes`, which releases the GIL for the call (so ``cores=N`` threads run
them in parallel).

The torch codecs stay the reference: the C functions compute the same IEEE
operations in the same order (no FMA contraction, no fast-math) and the same
integer arithmetic on the bit patterns, so every byte and every decoded value
is equal (``tests/test_native.py`` compares them on fresh random inputs and
special values). Where no C compiler is present, or ``NEARSTEP_NATIVE=0``, the
torch codecs run, with the same numbers, only slower; :func:`status` says
which, and ``nearstep bench io`` prints it.

For Adam and AdamW the device's pass goes one step further: :class:`AdamPass` decodes a tile
of each state tensor, runs the update in C and encodes it back in one call
([Note: Adam in the codecs' pass] in ``native.c``). That loop is torch's fused CPU kernel,
operation for operation, so it is checked against torch itself on first use
(:func:`adam_lanes`) and left out where they differ; :func:`unfused` leaves it out on request.

The library is built once per source, compiler and CPU into
``$NEARSTEP_CACHE/native`` (default ``~/.cache/nearstep/native``), written under
a temporary name and renamed into place, so processes building it at once do
not see each other's half-written files.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import itertools
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from torch import Tensor

from .maps import _signed_encode_lut
from .master import Bf16KahanMaster, Bf16SrMaster, Fp32Master, MasterCodec
from .moments import Bf16Moments, Fp8Moments, Fp32Moments, Int8Moments, MomentCodec, _unsigned
from .rounding import _noise_table

__all__ = ["available", "status", "disabled", "decode", "encode_", "plan", "Plan", "library_path",
           "AdamPass", "adam_pass", "adam_constants", "adam_lanes", "unfused", "ADAM_TILE"]

_SOURCE = Path(__file__).with_name("native.c")
_FLAGS = ("-O3", "-march=native", "-std=c11", "-fPIC", "-shared", "-ffp-contract=off",
          "-fno-math-errno", "-fno-trapping-math")
_lock = threading.Lock()
_state: dict[str, object] = {}  # "lib": the loaded library or None, "why": why not
_disabled: list[bool] = [False]  # set by disabled(), for the whole process
_unfused: list[bool] = [False]  # set by unfused()


def _cache_dir() -> Path:
    root = os.environ.get("NEARSTEP_CACHE")
    return Path(root) / "native" if root else Path.home() / ".cache" / "nearstep" / "native"


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _cpu_key() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


def library_path() -> Path | None:
    """Where the library for this source, compiler and CPU is (or would be) cached; None without a compiler."""
    cc = _compiler()
    if cc is None:
        return None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    digest = hashlib.sha256(
        _SOURCE.read_bytes() + repr((_FLAGS, cc, version, _cpu_key())).encode()
    ).hexdigest()[:20]
    return _cache_dir() / f"codecs-{digest}.so"


def _build() -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get("NEARSTEP_NATIVE", "1") == "0":
        return None, "off (NEARSTEP_NATIVE=0)"
    cc, path = _compiler(), library_path()
    if cc is None or path is None:
        return None, "no C compiler (cc, gcc or clang) on PATH: the torch codecs run"
    if not path.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".build-", suffix=".so")
            os.close(fd)
            try:
                done = subprocess.run([cc, *_FLAGS, str(_SOURCE), "-o", tmp, "-lm"],
                                      capture_output=True, text=True, timeout=300)
                if done.returncode != 0:
                    return None, f"{cc} failed ({done.stderr.strip()[:400]}): the torch codecs run"
                os.replace(tmp, path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        except (OSError, subprocess.SubprocessError) as err:
            return None, f"could not build the native codecs in {path.parent} ({err}): the torch codecs run"
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as err:
        return None, f"could not load {path} ({err}): the torch codecs run"
    p, i64, u64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_int
    signatures = {
        "ns_bf16_decode": [p, p, i64],
        "ns_kahan_decode": [p, p, p, i64],
        "ns_master_encode": [p, p, p, i64, u64, i64, p, c_int],
        "ns_int8_decode": [p, p, p, i64, i64, c_int, p],
        "ns_int8_encode": [p, p, p, i64, i64, c_int, p, p, c_int],
        "ns_bf16m_encode": [p, p, i64, c_int, c_int],
        "ns_adam_pass": [p, i64, i64, i64, i64, p, p, c_int, u64, p, i64, i64],
        "ns_adam_elements": [p, p, p, p, i64, p, c_int],
    }
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, None
    return lib, f"native ({path.name}, {cc})"


def _library() -> ctypes.CDLL | None:
    if _disabled[0]:
        return None
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                lib, why = _build()
                _state["why"] = why
                _state["lib"] = lib
                if lib is None and not why.startswith("off"):
                    warnings.warn(f"nearstep: {why}; compressed state formats are slower", RuntimeWarning,
                                  stacklevel=3)
    return _state["lib"]  # type: ignore[return-value]


def available() -> bool:
    """True when the native codecs are built and in use."""
    return _library() is not None


def status() -> str:
    """What runs the codecs: ``native (...)``, or why the torch codecs run."""
    _library()
    if _disabled[0]:
        return "torch (native codecs disabled by formats.native.disabled())"
    return str(_state.get("why", "unknown"))


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Run the torch reference codecs in this process while the block runs (tests, benchmarks);
    the engine's threads see it too. Not for concurrent use by several threads."""
    before = _disabled[0]
    _disabled[0] = True
    try:
        yield
    finally:
        _disabled[0] = before


@contextlib.contextmanager
def unfused() -> Iterator[None]:
    """Leave the fused Adam pass out while the block runs (the native codecs and torch's kernel
    run one after the other, as before it): the reference of tests and ``bench io``'s A/B rows."""
    before = _unfused[0]
    _unfused[0] = True
    try:
        yield
    finally:
        _unfused[0] = before


# The 256 code values of the 8-bit maps before a block's multiplier, by mode.
_DYN_SIGNED, _DYN_UNSIGNED, _LIN_SIGNED, _LIN_UNSIGNED, _FP8_SIGNED, _FP8_UNSIGNED = 0, 1, 2, 3, 4, 5


def _fp16_of(patterns: Tensor) -> Tensor:
    return patterns.to(torch.int16).view(torch.float16).float()


_LUTS: dict[int, Tensor] = {}


def _lut(mode: int) -> Tensor:
    if mode not in _LUTS:
        codes = torch.arange(256, dtype=torch.int32)
        if mode == _DYN_SIGNED:
            table = _fp16_of((codes & 0x80) << 8 | (codes & 0x7F) << 7)
        elif mode == _DYN_UNSIGNED:
            table = _fp16_of(codes << 7)
        elif mode == _LIN_SIGNED:
            table = torch.where(codes < 128, codes, codes - 256).float()
        elif mode == _LIN_UNSIGNED:
            table = codes.float()
        else:
            dtype = torch.float8_e4m3fn if mode == _FP8_SIGNED else torch.float8_e5m2
            table = codes.to(torch.uint8).view(dtype).float()
        _LUTS[mode] = table.contiguous()
    return _LUTS[mode]


_NARROW_NOISE: dict[int, Tensor] = {}


def _narrow_noise(bits: int) -> Tensor:
    """One period of rounding.py's noise table as uint16 values (stored in an int16 tensor)."""
    if bits not in _NARROW_NOISE:
        period = _noise_table(bits)[: 1 << 16]
        assert int(period.max()) < (1 << 16) and int(period.min()) >= 0
        _NARROW_NOISE[bits] = period.to(torch.int32).bitwise_and(0xFFFF).to(torch.int16).contiguous()
    return _NARROW_NOISE[bits]


def _int8_mode(codec: Int8Moments | Fp8Moments, name: str) -> int:
    """The C code's mode of a blocked one-byte codec for moment ``name``."""
    unsigned = _unsigned(name)
    if isinstance(codec, Fp8Moments):
        return _FP8_UNSIGNED if unsigned else _FP8_SIGNED
    if codec.qmap == "dynamic":
        return _DYN_UNSIGNED if unsigned else _DYN_SIGNED
    return _LIN_UNSIGNED if unsigned else _LIN_SIGNED


def _ptr(t: Tensor) -> int:
    return t.data_ptr()


def decode(codec: MasterCodec | MomentCodec, name: str, regions: Mapping[str, Tensor], out: Tensor) -> bool:
    """Decode ``name`` from ``regions`` into ``out`` natively; False where this codec has no
    native pass (fp32 copies, or the library is unavailable): then the caller runs the torch codec."""
    lib = _library()
    if lib is None:
        return False
    n = out.numel()
    if isinstance(codec, Bf16SrMaster):
        lib.ns_bf16_decode(_ptr(regions[name]), _ptr(out), n)
    elif isinstance(codec, Bf16KahanMaster):
        lib.ns_kahan_decode(_ptr(regions[name]), _ptr(regions[name + ".lo"]), _ptr(out), n)
    elif isinstance(codec, Bf16Moments):
        lib.ns_bf16_decode(_ptr(regions[name]), _ptr(out), n)
    elif isinstance(codec, (Int8Moments, Fp8Moments)):
        mode = _int8_mode(codec, name)
        lib.ns_int8_decode(_ptr(regions[name]), _ptr(regions[name + ".scale"]), _ptr(out), n, codec.block, mode,
                           _ptr(_lut(mode)))
    else:
        return False
    return True


def encode_(codec: MasterCodec | MomentCodec, name: str, values: Tensor, regions: Mapping[str, Tensor], *,
            seed: int = 0, first: int = 0, write_back: bool = True) -> bool:
    """Encode ``values`` into ``regions`` natively (the master's ``values`` always become what was
    stored, a moment's with ``write_back``); False where this codec has no native pass.

    ``first`` is the slice element ``values[0]`` is, which the stochastic rounding noise depends on.
    """
    lib = _library()
    if lib is None:
        return False
    n = values.numel()
    if isinstance(codec, (Bf16SrMaster, Bf16KahanMaster)):
        dropped = 16 if isinstance(codec, Bf16SrMaster) else 8
        low = _ptr(regions[name + ".lo"]) if dropped == 8 else None
        lib.ns_master_encode(_ptr(values), _ptr(regions[name]), low, n, int(seed) & (2**64 - 1), int(first),
                             _ptr(_narrow_noise(dropped)), dropped)
    elif isinstance(codec, Bf16Moments):
        lib.ns_bf16m_encode(_ptr(values), _ptr(regions[name]), n, int(_unsigned(name)), int(bool(write_back)))
    elif isinstance(codec, (Int8Moments, Fp8Moments)):
        mode = _int8_mode(codec, name)
        lib.ns_int8_encode(_ptr(values), _ptr(regions[name]), _ptr(regions[name + ".scale"]), n, codec.block, mode,
                           _ptr(_signed_encode_lut()), _ptr(_lut(mode)), int(bool(write_back)))
    else:
        return False
    return True


class Plan:
    """One state tensor's native decode and encode over element ranges of a file, bound once to the
    file's memory (:func:`plan`), so that each call of the device's pass is one C call on addresses
    (a few microseconds less per chunk than slicing the region views first).

    ``decode(start, count, out_address)`` fills ``count`` fp32 values at ``out_address`` from
    elements ``start..`` of the file; ``encode(start, count, values_address, seed)`` stores them
    back (a master's values become what was stored; a moment's are left as they were). ``start``
    is on a block boundary for blocked moments.
    """

    __slots__ = ("decode", "encode")

    def __init__(self, decode: Callable[[int, int, int], None], encode: Callable[[int, int, int, int], None]) -> None:
        self.decode, self.encode = decode, encode


def plan(codec: MasterCodec | MomentCodec, name: str, regions: Mapping[str, Tensor]) -> Plan | None:
    """The native :class:`Plan` of state tensor ``name`` in ``regions`` (whole-file views, which must
    outlive the plan); None where the library is unavailable or the codec has no native pass."""
    lib = _library()
    if lib is None:
        return None
    if isinstance(codec, (Fp32Master, Fp32Moments)):
        base, move = _ptr(regions[name]), ctypes.memmove
        return Plan(lambda start, count, out: move(out, base + 4 * start, 4 * count),
                    lambda start, count, values, seed: move(base + 4 * start, values, 4 * count))
    if isinstance(codec, (Bf16SrMaster, Bf16KahanMaster)):
        high, dropped = _ptr(regions[name]), 16 if isinstance(codec, Bf16SrMaster) else 8
        table = _ptr(_narrow_noise(dropped))
        master_encode = lib.ns_master_encode
        if dropped == 16:
            bf16_decode = lib.ns_bf16_decode
            return Plan(lambda start, count, out: bf16_decode(high + 2 * start, out, count),
                        lambda start, count, values, seed: master_encode(
                            values, high + 2 * start, None, count, seed & (2**64 - 1), start, table, 16))
        low, kahan_decode = _ptr(regions[name + ".lo"]), lib.ns_kahan_decode
        return Plan(lambda start, count, out: kahan_decode(high + 2 * start, low + start, out, count),
                    lambda start, count, values, seed: master_encode(
                        values, high + 2 * start, low + start, count, seed & (2**64 - 1), start, table, 8))
    if isinstance(codec, Bf16Moments):
        region, unsigned = _ptr(regions[name]), int(_unsigned(name))
        bf16_decode, bf16m_encode = lib.ns_bf16_decode, lib.ns_bf16m_encode
        return Plan(lambda start, count, out: bf16_decode(region + 2 * start, out, count),
                    lambda start, count, values, seed: bf16m_encode(values, region + 2 * start, count, unsigned, 0))
    if isinstance(codec, (Int8Moments, Fp8Moments)):
        codes, scales, block = _ptr(regions[name]), _ptr(regions[name + ".scale"]), codec.block
        mode = _int8_mode(codec, name)
        lut, signed_lut = _ptr(_lut(mode)), _ptr(_signed_encode_lut())
        int8_decode, int8_encode = lib.ns_int8_decode, lib.ns_int8_encode
        return Plan(lambda start, count, out: int8_decode(codes + start, scales + 4 * (start // block), out, count,
                                                         block, mode, lut),
                    lambda start, count, values, seed: int8_encode(
                        values, codes + start, scales + 4 * (start // block), count, block, mode, signed_lut, lut, 0))
    return None


# ---- the fused Adam pass ([Note: Adam in the codecs' pass] in native.c) ----------------------------

#: Elements per tile of :class:`AdamPass` at most, the working buffer's size (``3 * ADAM_TILE``
#: floats): a blocked moment (8-bit, fp8) is decoded and encoded a tile at a time, whole blocks of
#: at most this many elements. Formats with larger blocks are left to the unfused pass.
ADAM_TILE = 2048
#: Elements the other parts are decoded, updated and encoded in at a time, within a tile: see
#: ns_adam_pass in native.c for why smaller than a tile.
ADAM_PIECE = 512

_PART_FP32, _PART_BF16_SR, _PART_KAHAN, _PART_INT8, _PART_BF16M = 0, 1, 2, 3, 4
_F_DECAY, _F_L2, _F_SMALL_LERP = 1, 2, 4
_ADAM_NAMES = ("master", "exp_avg", "exp_avg_sq")


class _Part(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int32), ("mode", ctypes.c_int32), ("block", ctypes.c_int64),
                ("data", ctypes.c_void_p), ("aux", ctypes.c_void_p), ("table", ctypes.c_void_p),
                ("signed_lut", ctypes.c_void_p)]


def _f32(x: float) -> float:
    return ctypes.c_float(x).value


def adam_constants(lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, *, decoupled: bool,
                   step: int) -> tuple[ctypes.Array, int]:
    """The constants and flags of ``ns_adam_pass`` for one step of Adam (``decoupled``: AdamW),
    computed as torch's fused CPU kernel computes them: in double from the step as a float32, then
    cast to float (the bias corrections use the C library's ``pow``, as ``**`` does).

    Not for ``maximize=True``: there torch's own kernel gives a nan gradient's second moment one
    sign on one thread and the other on several (its build folds the two negations of
    ``(c * -g) * -g`` in one copy of the loop and not in the other), so no fixed loop equals it;
    the engine leaves maximizing groups to torch's kernel."""
    t = _f32(float(step))
    bias1, bias2 = 1.0 - beta1 ** t, 1.0 - beta2 ** t
    lerp = _f32(1.0 - beta1)
    small = abs(lerp) < 0.5
    flags = _F_SMALL_LERP if small else 0
    if weight_decay != 0.0:
        flags |= _F_DECAY if decoupled else _F_L2
    values = (_f32(1.0 - lr * weight_decay), _f32(weight_decay), lerp if small else _f32(lerp - 1.0), _f32(beta2),
              _f32(1.0 - beta2), _f32(math.sqrt(bias2)), _f32(eps), _f32(-(lr / bias1)))
    return (ctypes.c_float * len(values))(*values), flags


def adam_lanes() -> int:
    """The vector length of torch's fused Adam kernel on this CPU where :class:`AdamPass` computes
    what it computes (checked once per process against torch), else 0 (the pass is not used).

    torch's kernel computes the last ``n % lanes`` elements of each tensor in a scalar loop that
    rounds differently; the caller gives those elements to torch."""
    if "lanes" not in _state:
        _library()  # built outside the lock below, which _library takes too
        with _lock:
            if "lanes" not in _state:
                _state["lanes"], _state["adam_why"] = _check_adam()
    return 0 if _disabled[0] or _unfused[0] else int(_state["lanes"])  # type: ignore[call-overload]


def _check_adam() -> tuple[int, str]:
    lib = _library()
    if lib is None:
        return 0, "no native library"
    lanes = {"AVX512": 16, "AVX2": 8}.get(torch.backends.cpu.get_cpu_capability(), 0)
    if lanes == 0:
        return 0, f"torch's CPU kernels are {torch.backends.cpu.get_cpu_capability()}, not checked against"
    generator = torch.Generator().manual_seed(1234)
    n = 64 * lanes
    specials = torch.tensor([0x7FC00000, 0xFFC00001, 0x7FC12345, 0x7F800000, 0xFF800000, 0x80000000, 0, 1,
                             0x7F7FFFFF], dtype=torch.int64).to(torch.int32).view(torch.float32)
    cases = [(1e-3, 0.9, 0.999, 1e-8, 0.01, True, 1), (3e-2, 0.2, 0.95, 1e-6, 0.1, True, 7),
             (1e-3, 0.9, 0.999, 1e-8, 0.05, False, 1000), (1e-2, 0.5, 0.9, 1e-3, 0.0, False, 2)]
    threads = torch.get_num_threads()
    # torch's kernel runs its loop inline on one thread and through its pool on several, two
    # copies that its compiler may have built differently: both must agree with this one.
    for count, (lr, beta1, beta2, eps, decay, decoupled, step) in itertools.product(sorted({1, threads}), cases):
        p, g = torch.randn(n, generator=generator), torch.randn(n, generator=generator)
        m, v = torch.randn(n, generator=generator) * 0.1, torch.rand(n, generator=generator) * 0.01
        g[::37] = 0.0
        for t in (p, g, m, v):  # nans of both signs with payloads, infinities, signed zeros, the largest
            t[torch.randperm(n, generator=generator)[: len(specials)]] = specials
        ref = [p.clone(), m.clone(), v.clone()]
        fused = torch._fused_adamw_ if decoupled else torch._fused_adam_
        torch.set_num_threads(count)
        try:
            fused([ref[0]], [g.clone()], [ref[1]], [ref[2]], [], [torch.tensor(float(step))], lr=lr, beta1=beta1,
                  beta2=beta2, weight_decay=decay, eps=eps, amsgrad=False, maximize=False)
        finally:
            torch.set_num_threads(threads)
        constants, flags = adam_constants(lr, beta1, beta2, eps, decay, decoupled=decoupled, step=step)
        lib.ns_adam_elements(p.data_ptr(), m.data_ptr(), v.data_ptr(), g.data_ptr(), n, constants, flags)
        if not all(torch.equal(a.view(torch.int32), b.view(torch.int32)) for a, b in zip((p, m, v), ref)):
            return 0, "differs from this torch's fused Adam kernel: the torch kernel runs between the codecs"
    return lanes, f"fused with the codecs ({lanes} lanes, checked against torch)"


class AdamPass:
    """Decode, update with Adam and encode element ranges of one compressed file image in one C
    call each (``ns_adam_pass``), bound to the file's memory once (:func:`adam_pass`).

    ``run(a, b, lo, hi, grad_address, constants, flags, seed, work_address)`` decodes elements
    ``[a, b)`` of the master and both moments (``a`` on a block, ``b`` on one or at the file's
    end), applies one step to elements ``[lo, hi)`` with the fp32 gradient at ``grad_address``
    (its element ``lo``), and encodes ``[a, b)`` back, as the torch path (decode, the fused
    kernel, encode) would, where ``hi - lo`` is a multiple of :func:`adam_lanes`.
    ``work_address``: ``3 * ADAM_TILE`` floats of the calling thread's own.
    """

    __slots__ = ("_parts", "_run", "_keep", "tile", "piece")

    def __init__(self, parts: ctypes.Array, run: Callable[..., None], keep: tuple[object, ...], tile: int,
                 piece: int) -> None:
        self._parts, self._run, self._keep, self.tile, self.piece = parts, run, keep, tile, piece

    def run(self, a: int, b: int, lo: int, hi: int, grad_address: int, constants: ctypes.Array, flags: int,
            seed: int, work_address: int) -> None:
        self._run(self._parts, a, b, lo, hi, grad_address, constants, flags, seed & (2**64 - 1), work_address,
                  self.tile, self.piece)


def adam_pass(master: MasterCodec, moments: MomentCodec, regions: Mapping[str, Tensor],
              state_names: tuple[str, ...]) -> AdamPass | None:
    """The :class:`AdamPass` over ``regions`` (whole-file views that must outlive it); None where
    the state is not Adam's, the library is unavailable, or :func:`adam_lanes` is 0."""
    if tuple(state_names) != _ADAM_NAMES or adam_lanes() == 0:
        return None
    lib = _library()
    if lib is None:
        return None
    parts = (_Part * 3)()
    keep: list[object] = []
    for part, name in zip(parts, _ADAM_NAMES):
        codec = master if name == "master" else moments
        part.data = _ptr(regions[name])
        if isinstance(codec, (Fp32Master, Fp32Moments)):
            part.kind = _PART_FP32
        elif isinstance(codec, (Bf16SrMaster, Bf16KahanMaster)):
            kahan = isinstance(codec, Bf16KahanMaster)
            noise = _narrow_noise(8 if kahan else 16)
            part.kind, part.table = (_PART_KAHAN if kahan else _PART_BF16_SR), _ptr(noise)
            if kahan:
                part.aux = _ptr(regions[name + ".lo"])
            keep.append(noise)
        elif isinstance(codec, Bf16Moments):
            part.kind, part.mode = _PART_BF16M, int(_unsigned(name))
        elif isinstance(codec, (Int8Moments, Fp8Moments)):
            mode = _int8_mode(codec, name)
            lut, signed_lut = _lut(mode), _signed_encode_lut()
            part.kind, part.mode, part.block = _PART_INT8, mode, codec.block
            part.aux, part.table, part.signed_lut = _ptr(regions[name + ".scale"]), _ptr(lut), _ptr(signed_lut)
            keep.extend((lut, signed_lut))
        else:
            return None
    block = max(max(int(part.block), 1) for part in parts)
    if ADAM_TILE % block:
        return None
    return AdamPass(parts, lib.ns_adam_pass, tuple(keep), max(block, ADAM_PIECE), ADAM_PIECE)
