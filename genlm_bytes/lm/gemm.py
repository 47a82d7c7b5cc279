"""The matrix products of a lean pass on a CPU: oneDNN's, where torch has it.

``F.linear`` on a CPU runs the BLAS torch was built with (MKL in the PyPI wheels). On the
machine the benchmarks run on (an AMD EPYC with AVX-512, 2 cores, torch 2.13 with MKL
2024.2), MKL's float32 product of a decoder's weights took twice as long as oneDNN's, the
matrix library torch bundles (and the one ``torch.compile`` uses for linear layers on a
CPU), at every row count: a SmolLM2 step's products 1 row 33 -> 20 ms, 4 rows 51 -> 22 ms,
27 rows 73 -> 35 ms, 512 rows 706 -> 332 ms (``benchmarks/bench_lean.py --tokens ...``). MKL
also takes a path for 2 to 3 rows that reads the weights once per row.

:func:`linear_fn` gives ``linear(x, w, b=None)``: oneDNN's product for float32 tensors on the
CPU outside autograd, ``F.linear`` otherwise. It is the same function of the same weights;
the rounding differs in the last bits (about 1e-6 relative), as between any two BLAS
libraries. It is used only after a check on a few rows agrees with ``F.linear``
(:func:`onednn_works`).

Not handled: other dtypes and devices (``F.linear``); autograd (``F.linear``: oneDNN's
product here has no backward).
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

CHECK_TOLERANCE = 1e-4  # largest relative difference from F.linear accepted by the check


def _onednn_op():
    """torch's oneDNN linear op (``torch.ops.mkldnn._linear_pointwise``), or None."""
    try:
        if not torch.backends.mkldnn.is_available():
            return None
        return torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None


@functools.lru_cache(maxsize=1)
def onednn_works() -> bool:
    """Whether oneDNN's product is there and agrees with ``F.linear`` on a few shapes (with
    and without a bias, 1 to 9 rows, a 3-D input, a transposed weight); checked once."""
    op = _onednn_op()
    if op is None:
        logger.debug("oneDNN products not used: torch has no oneDNN linear op")
        return False
    gen = torch.Generator().manual_seed(0)
    try:
        with torch.inference_mode():
            for shape in ((1, 48), (9, 48), (2, 3, 48)):
                x = torch.randn(shape, generator=gen)
                w = torch.randn(40, 48, generator=gen)
                b = torch.randn(40, generator=gen)
                for ww, bb in ((w, None), (w, b), (w.t().contiguous().t(), None)):
                    want, got = F.linear(x, ww, bb), op(x, ww, bb, "none", [], "")
                    if got.shape != want.shape or not torch.allclose(got, want, rtol=CHECK_TOLERANCE,
                                                                     atol=CHECK_TOLERANCE * float(want.abs().max())):
                        logger.debug("oneDNN products not used: they differ from F.linear")
                        return False
    except Exception:
        logger.debug("oneDNN products not used", exc_info=True)
        return False
    return True


def linear_fn(onednn: bool = True):
    """``linear(x, w, b=None)``: oneDNN's product where it applies and ``onednn`` is set and
    :func:`onednn_works`, else ``F.linear`` itself."""
    if not (onednn and onednn_works()):
        return F.linear
    op = _onednn_op()
    f32 = torch.float32

    def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        if (x.dtype is f32 and w.dtype is f32 and x.device.type == "cpu" and w.device.type == "cpu"
                and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))):
            return op(x, w, b, "none", [], "")
        return F.linear(x, w, b)

    linear.onednn = True
    return linear
