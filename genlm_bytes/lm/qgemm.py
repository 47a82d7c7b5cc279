"""Products by weights that are small integers per group of 32 inputs, as the file held them.

A model loaded from a GGUF file of 4- or 8-bit weights (the embedded SmolLM2 is ``Q4_1``, its
output layer ``Q8_0``) is dequantized to float32 by transformers: every weight of a group of
32 inputs is then ``q * scale + offset`` exactly, ``q`` a 4- or 8-bit integer. A decode step
of such a model reads 540 MB of float32 weights to compute one row (SmolLM2-135M), which is
what bounds it on a CPU. The same weights as 4-bit codes and a float32 scale and offset per
group are 6 bits a weight: 5x less to read.

:func:`quantized` finds such a form of a float32 matrix, if it has one: the codes, scales and
offsets whose weights, made as the product makes them (one fused multiply-add, one
rounding), are the matrix's own float32 weights, bit for bit (the sign of a zero aside). The
check is on the whole matrix; one weight off and the matrix stays float32. (Candidates are
tried in one pass of the kernel's library, ``qgemm_find``: per group, 4 bits with the group's
least weight as offset and its span over 15 levels as scale, as float16 or not; 8 bits with
the largest magnitude over 127, as float32 or float16; then the least gap between two
weights, as float16, as it is, or halved.) So a product by the codes is a product by the very same weights: its outputs differ from oneDNN's or BLAS's
only by the order of the float32 sums. Each output is the sum of its groups' sums of 32, in
order, so a row comes out bit for bit the same whatever the number of rows of its product;
and it is closer to a float64 product than oneDNN's (SmolLM2's matrices: at most 0.8-2.3e-7 of
the largest output off, oneDNN's 4.4-12e-7).

Measured (SmolLM2's 210 decoder matrices and its output layer, 2 threads, in a thread of its
own, against oneDNN's packed float32 products, ``lm/gemm.py``): 1 row 0.38x the time, 4 rows
0.49x, 8 rows 0.53x, 32 rows 0.85x, 64 rows 0.93x, 256 rows 1.03x.

The products run in a small C++ kernel (``qgemm.cpp``: AVX-512, or AVX2 on a CPU without it,
the same operations lane by lane, so the same bits), compiled on first use with the machine's
C++ compiler (``CXX``, else ``g++``; about 1 s) into the cache folder and loaded with ``ctypes``;
it runs on torch's own OpenMP runtime, linked by its path (one thread pool per thread:
``lm/openmp.py``). Without a compiler, without AVX2, with ``GENLM_BYTES_QGEMM=0``, or if the
build fails, nothing here is used (:func:`available` is False) and every product stays
float32. ``GENLM_BYTES_QGEMM=avx2`` asks for the AVX2 build where both run.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import math
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

GROUP = 32  # inputs per group of one scale and offset
SOURCE = Path(__file__).with_name("qgemm.cpp")
SOURCES = (SOURCE, Path(__file__).with_name("fused.cpp"))  # (fused.cpp: a decoder layer around the products)
FLAGS = ("-O3", "-fPIC", "-fopenmp", "-std=c++17")
# builds of the kernel, the first one the CPU runs is used: (compiler flags, the CPU flags they need)
VARIANTS = {
    "avx512": (("-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma", "-mf16c"), ("avx512f", "avx512bw", "avx512vl", "fma", "f16c")),
    "avx2": (("-mavx2", "-mfma", "-mf16c"), ("avx2", "fma", "f16c")),
}


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return set()


def _variant() -> str | None:
    """The build to use here: ``GENLM_BYTES_QGEMM`` names one (``avx512``, ``avx2``; ``0``: none),
    else the first of :data:`VARIANTS` the CPU runs."""
    asked, flags = os.environ.get("GENLM_BYTES_QGEMM", ""), _cpu_flags()
    if asked not in ("", "0", "1", *VARIANTS):
        raise ValueError(f"GENLM_BYTES_QGEMM must be 0, 1 or one of {', '.join(VARIANTS)}, got {asked!r}")
    if asked == "0":
        return None
    for name, (_, needs) in VARIANTS.items():
        if asked in ("", "1", name) and all(x in flags for x in needs):
            return name
    return None


def _torch_gomp() -> Path | None:
    """The OpenMP runtime torch's wheel carries (linking to it keeps one thread pool per thread)."""
    lib = Path(torch.__file__).parent / "lib"
    found = sorted(lib.glob("libgomp*.so*"))
    return found[0] if found else None


def _build(dest: Path, gomp: Path, flags: tuple) -> None:
    compiler = os.environ.get("CXX", "g++")
    with tempfile.TemporaryDirectory() as tmp:
        objs = [str(Path(tmp) / f"{src.stem}.o") for src in SOURCES]
        out = Path(tmp) / dest.name
        for src, obj in zip(SOURCES, objs):
            subprocess.run([compiler, *flags, "-c", str(src), "-o", obj], check=True,
                           capture_output=True, timeout=300)
        subprocess.run([compiler, "-shared", *objs, "-o", str(out), str(gomp),
                        f"-Wl,-rpath,{gomp.parent}"], check=True, capture_output=True, timeout=300)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(out, dest)  # (atomic: another process building the same file reads a whole one)


@functools.cache
def _library(variant: str | None = ""):
    """The compiled kernel (``variant``: one of :data:`VARIANTS`; by default :func:`_variant`'s),
    loaded; None where it cannot be had here (logged at debug)."""
    variant = _variant() if variant == "" else variant
    if variant is None:
        logger.debug("quantized products not used: switched off, or the CPU has neither AVX-512 nor AVX2")
        return None
    gomp = _torch_gomp()
    if gomp is None or "OpenMP" not in torch.__config__.parallel_info():
        logger.debug("quantized products not used: torch runs no GNU OpenMP")
        return None
    from genlm_bytes.lm.default import cache_dir

    flags = FLAGS + VARIANTS[variant][0]
    text = b"".join(src.read_bytes() for src in SOURCES)
    key = hashlib.sha256(text + " ".join(flags).encode() + str(gomp).encode()).hexdigest()[:16]
    path = cache_dir() / "kernels" / f"qgemm-{variant}-{key}.so"
    try:
        if not path.exists():
            _build(path, gomp, flags)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as e:
        logger.debug("quantized products not used: the kernel did not build or load (%s)", e)
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.qgemm_product.argtypes = [p, i64, i64, p, p, p, i64, ctypes.c_int, p, i64, ctypes.c_int]
    lib.qgemm_product.restype = ctypes.c_int
    lib.qgemm_dequantize.argtypes = [i64, p, p, p, i64, ctypes.c_int, p, ctypes.c_int]
    lib.qgemm_dequantize.restype = ctypes.c_int
    lib.qgemm_find.argtypes = [p, i64, i64, ctypes.c_int, p, p, p, ctypes.c_int]
    lib.qgemm_find.restype = i64
    f32 = ctypes.c_float
    lib.lean_attn_in.argtypes = [p, p, i64, i64, i64, f32, p, p, i64, i64, i64, p, p, p, ctypes.c_int]
    lib.lean_attn_in.restype = ctypes.c_int
    lib.lean_attend.argtypes = [p, i64, i64, i64, i64, i64, p, i64, i64, i64, p, i64, i64, i64, i64, p, f32, p,
                                ctypes.c_int]
    lib.lean_attend.restype = ctypes.c_int
    lib.lean_attn_out.argtypes = [p, p, i64, i64, f32, p, i64, i64, ctypes.c_int]
    lib.lean_attn_out.restype = ctypes.c_int
    return lib


def available() -> bool:
    """Whether the kernel is here (built and loaded)."""
    return _library() is not None


@dataclass(frozen=True)
class QuantizedWeight:
    """A float32 (N, K) matrix as codes, scales and offsets (module docstring's layouts)."""

    bits: int
    codes: torch.Tensor  # uint8
    scale: torch.Tensor  # float32 (N/16, K/32, 16)
    offset: torch.Tensor
    shape: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.offset))

    def dequantize(self) -> torch.Tensor:
        n, k = self.shape
        w = torch.empty(n, k, dtype=torch.float32)
        rc = _library().qgemm_dequantize(k, self.codes.data_ptr(), self.scale.data_ptr(),
                                         self.offset.data_ptr(), n, self.bits, w.data_ptr(), torch.get_num_threads())
        if rc:
            raise ValueError(f"the kernel does not take a ({n}, {k}) matrix")
        return w

    def product(self, x2: torch.Tensor, variant: str | None = "") -> torch.Tensor:
        """``x2`` (M, K), float32 on the CPU, by the weights: (M, N) (ValueError for another input;
        ``variant``: by that build of the kernel, which must be there)."""
        n, k = self.shape
        if x2.dtype != torch.float32 or x2.device.type != "cpu" or x2.dim() != 2 or x2.shape[1] != k:
            raise ValueError(f"expected a float32 CPU matrix of {k} columns, got {x2.dtype} {tuple(x2.shape)}")
        x2 = x2.contiguous()
        m = x2.shape[0]
        out = torch.empty(m, n, dtype=torch.float32)
        rc = _library(variant).qgemm_product(x2.data_ptr(), m, k, self.codes.data_ptr(), self.scale.data_ptr(),
                                      self.offset.data_ptr(), n, self.bits, out.data_ptr(), out.stride(0),
                                      torch.get_num_threads())
        if rc:
            raise ValueError(f"the kernel does not take a ({n}, {k}) matrix")
        return out


def _misses(qw: QuantizedWeight, groups: torch.Tensor) -> torch.Tensor:
    """Per group (N, K/32): whether a weight the codes make differs from the float32 one (the
    sign of a zero aside: GGUF's Q4_0 makes -0.0 where a negative scale meets level 8)."""
    return (qw.dequantize().reshape(groups.shape) != groups).any(-1)


@torch.no_grad()
def quantized(w: torch.Tensor) -> QuantizedWeight | None:
    """``w``'s form as 4-bit (or else 8-bit) codes per group of 32 inputs that makes every one of
    its float32 weights bit for bit (module docstring), or None: no such form found, a shape
    the kernel does not take, or no kernel."""
    if _library() is None or w.dim() != 2 or w.dtype != torch.float32 or w.device.type != "cpu":
        return None
    n, k = w.shape
    if n % 16 or k % GROUP or n == 0:
        return None
    groups = w.detach().reshape(n, k // GROUP, GROUP).contiguous()
    if not math.isfinite(float(groups.abs().sum(dtype=torch.float64))):  # (a NaN or an infinity)
        return None
    flat = groups.reshape(-1, GROUP)
    count = min(256, flat.shape[0]) // 16 * 16  # (as 16 rows of groups: the kernel's layout)
    sample = flat[torch.linspace(0, flat.shape[0] - 1, count).long()].reshape(16, count // 16, GROUP)
    for bits in (4, 8):  # (a few groups first: a matrix of other codes fails there, and cheaply)
        form = _found(groups, bits) if _found(sample, bits) is not None else None
        if form is not None:
            return form
    return None


def _found(groups: torch.Tensor, bits: int) -> QuantizedWeight | None:
    """``bits``-bit codes, scales and offsets of ``groups`` (N, K/32, 32) that make every weight,
    found by the kernel's library in one pass (``qgemm_find``: per group the first of its
    candidate scales that does), and checked again as the product makes the weights; or None."""
    n, k = groups.shape[0], groups.shape[1] * GROUP
    codes = torch.zeros(n // 16, k // 2 if bits == 4 else k, 16, dtype=torch.uint8)
    scale = torch.empty(n // 16, k // GROUP, 16, dtype=torch.float32)
    offset = torch.empty_like(scale)
    missed = _library().qgemm_find(groups.data_ptr(), n, k, bits, codes.data_ptr(), scale.data_ptr(),
                                   offset.data_ptr(), torch.get_num_threads())
    if missed:
        return None
    form = QuantizedWeight(bits, codes, scale, offset, (n, k))
    return None if bool(_misses(form, groups).any()) else form
