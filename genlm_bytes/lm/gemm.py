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

oneDNN compiles a kernel for every shape it meets and keeps it for the process (about
0.7 MB each on that machine: 512 row counts by a decoder's 4 weight shapes held about 1.3 GB).
So the row count of a product is rounded up to one of :data:`ROW_BUCKETS` (the padding rows
are zeros, their results dropped), a larger product runs in pieces of the largest, and the
engine charges the most those kernels can hold to its cache budget (:func:`kernel_bytes`).

A one-row product (a decode step's) goes to MKL after all, in the other layout: ``w @ x.T``
(the weight as the operand MKL streams, the row padded to two), not ``x @ w.T`` as
``F.linear`` asks. Measured there (session 17, the 210 decoder matrices of SmolLM2, 2
threads): 1 row 14.7-15.0 -> 11.9 ms (oneDNN -> this). 2 to 4 rows would gain as much (16.7-17.9
-> 11.6-12.5 ms; from 5 rows on oneDNN's is faster), but rows computed that way differ from
the same rows in a larger pass by MKL's rounding, not oneDNN's: a windowed prefill's log Z
moved 2.1e-4 against a one-window prefill's (tests/test_byte_lm.py allows 1e-4; it was
6.5e-5, as it is with one row), so :data:`SMALL_ROWS` is 1.

Weights in oneDNN's own layout (:func:`pack_weights`, ``linear_fn(packed=True)``). Given the
weights as torch stores them, oneDNN runs a slower kernel than for the blocked layout it would
pack them into. Packed once (``torch.ops.mkldnn._reorder_linear_weight``; 0.14 s for
SmolLM2-135M) the same products took (session 18, the 210 decoder matrices, 2 threads, ms):

| rows | 1 | 2 | 4 | 8 | 32 | 128 |
|---|---|---|---|---|---|---|
| plain layout | 13.0-16.3 | 17.6-19.0 | 17.4-18.5 | 19.6-20.3 | 31.0-32.4 | 79.6 |
| packed | 10.1-12.7 | 10.5-13.5 | 10.9-12.8 | 12.4-15.1 | 24.8-26.2 | 69.6 |

and the output layer (49,152 x 576) 4.0 -> 1.5 ms at 2 to 4 rows. A row comes out the same,
bit for bit, whatever the number of rows of its product (1 to 32 checked), and the same as the
plain layout's products of 2 rows or more: every pass rounds a row alike, so packed products
need no MKL path for small ones. The cost is a second copy of the weights (the model's own
stay as they are, for its own forward and for autograd), made by the engine
(``EngineConfig.packed_weights``) when it fits a quarter of the memory available. A pack is
used only while its weight is the same tensor, at the same address and version (a weight
changed in place is multiplied as it is now, and packed again when the engine next checks
the model); it is freed with its weight.

Groups (:func:`pack_groups`): weights that multiply the same input (a layer's query, key and
value projections; its gate and up projections) are packed as one matrix, their rows stacked,
in place of their own packs (the same bytes): ``linear.group(x, weights)`` gives their products
side by side in one product, each column bit for bit as by its own weight's pack. Five products
per layer become two: greedy generation 4-12% faster, 32 beams 9% (session 19). A group is used
while every weight in it is as it was packed; :func:`changed_weights` probes groups too.

Codes (``pack_weights(quantize=True)``, session 26): a matrix whose float32 weights are 4- or
8-bit codes per group of 32 inputs, as a model loaded from such a GGUF file has, is packed as
those codes instead (:mod:`genlm_bytes.lm.qgemm`: the same weights, bit for bit, a fifth of
the bytes) and multiplied on them at every row count, without row buckets or pieces; a
float32 pack is replaced by its codes where they are found, and a matrix without codes
keeps (or gets) oneDNN's pack.

Not handled: other dtypes and devices (``F.linear``); autograd (``F.linear``: oneDNN's
product here has no backward); groups with biases (their weights are packed one by one).
"""

from __future__ import annotations

import bisect
import functools
import logging
import threading
import weakref

import torch
import torch.nn.functional as F

from genlm_bytes.lm import qgemm
from genlm_bytes.lm.qgemm import QuantizedWeight

logger = logging.getLogger(__name__)

CHECK_TOLERANCE = 1e-4  # largest relative difference from F.linear accepted by the check
# Row counts oneDNN's products run with: exact up to 8 (a decode step, drafts, look-aheads), then
# steps of 1.25-1.5x (padding costs at most a third of a product); a product of more rows runs in
# pieces of the last. Prefill of the 9 suite texts, in one process: 1.16x exact row counts with
# steps of 1.5x, 1.09x with these (benchmarks/README.md, session 16).
ROW_BUCKETS = (1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 20, 24, 32, 40, 48, 64, 80, 96, 128, 160, 192, 256, 320, 384, 512)
KERNEL_BYTES = 1 << 20  # what one compiled kernel keeps, rounded up (0.7 MB measured; module docstring)
PROBE_TOLERANCE = 1e-6  # relative change of a probe product that counts as a changed weight (changed_weights)
SMALL_ROWS = 1  # products of at most this many rows run as w @ x.T through MKL (module docstring)


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


# oneDNN's packs, each of one weight or of a group of weights that multiply the same input (a layer's
# query, key and value projections; its gate and up projections) stacked as one matrix: one product
# instead of several, each output column computed as by its own weight's pack, bit for bit (session 19).
# A weight is in one pack at most.
_PACKS: dict[tuple, tuple] = {}  # ids of the weights -> (weakrefs to them, their versions, their addresses,
#                                   the pack, its product with the probe of the width, the weights' widths)
_MEMBER: dict[int, tuple] = {}  # id(weight) -> the key of the pack that holds it
_PACK_LOCK = threading.RLock()  # (re-entered by _forget: a weight collected while packing)
_NO_CODES: dict[tuple, tuple] = {}  # ids of weights -> their versions and addresses when no codes were found
_PROBES: dict[int, torch.Tensor] = {}  # width -> the (1, width) row a weight is multiplied by to see it changed


def _probe(w: torch.Tensor) -> torch.Tensor:
    """``w``'s product with a fixed pseudo-random row, ``(1, n)`` (:func:`changed_weights` compares
    it): a matrix-vector product, which reads the weight once (BLAS's product of two rows read it
    twice: 52 -> 33 ms for SmolLM2's weights). A change of ``w`` moves it unless the change is
    orthogonal to that row, which a random row makes a zero-probability event."""
    k = w.shape[1]
    x = _PROBES.get(k)
    if x is None:
        x = _PROBES[k] = torch.randn(1, k, generator=torch.Generator().manual_seed(k))
    return torch.mv(w.detach(), x[0])[None]


def _packable(w) -> bool:
    return (isinstance(w, torch.Tensor) and w.dim() == 2 and w.dtype is torch.float32 and w.device.type == "cpu"
            and not w.is_inference() and w.numel() > 0)


def _members(e: tuple) -> tuple | None:
    """The weights of pack entry ``e`` if every one is alive and as it was packed (same version
    and address), else None."""
    ws = tuple(r() for r in e[0])
    for w, v, a in zip(ws, e[1], e[2]):
        if w is None or w._version != v or w.data_ptr() != a:
            return None
    return ws


def packed_group(ws):
    """oneDNN's packed copy of the weights ``ws`` stacked (or of one weight), if :func:`pack_groups`
    (:func:`pack_weights`) made one for them as they are now (each the same tensor, at the same
    address and version), else None. ``ws``: an iterable of tensors (TypeError otherwise)."""
    return _pack_of(tuple(_weight_list(ws)))


def _pack_of(ws: tuple):
    """:func:`packed_group` of a tuple of tensors (every product asks: no checks)."""
    e = _PACKS.get(tuple(map(id, ws)))
    if e is None:
        return None
    for w, r, v, a in zip(ws, e[0], e[1], e[2]):
        if r() is not w or w._version != v or w.data_ptr() != a:
            return None
    return e[3]


def packed_weight(w: torch.Tensor):
    """oneDNN's packed copy of ``w`` if :func:`pack_weights` made one for ``w`` as it is now (same
    tensor, address and version), else None."""
    return _pack_of((w,))


def is_packed(w: torch.Tensor) -> bool:
    """Whether ``w`` as it is now is multiplied by a pack: its own, or its group's."""
    e = _PACKS.get(_MEMBER.get(id(w)))
    members = None if e is None else _members(e)
    return members is not None and any(m is w for m in members)


def _drop(key: tuple) -> None:
    if _PACKS.pop(key, None) is not None:
        for k in key:
            if _MEMBER.get(k) == key:
                del _MEMBER[k]


def _forget(key: tuple, ref) -> None:
    with _PACK_LOCK:
        e = _PACKS.get(key)
        if e is not None and any(r is ref for r in e[0]):
            _drop(key)


def _weight_list(weights) -> list:
    if isinstance(weights, torch.Tensor):
        raise TypeError("weights must be an iterable of tensors, not one tensor (pass [w])")
    try:
        return list(weights)
    except TypeError:
        raise TypeError(f"weights must be an iterable of tensors, got {type(weights).__name__}") from None


def _unpacked(weights) -> list[torch.Tensor]:
    """The packable weights of ``weights`` not multiplied by a pack as they are now, each once."""
    seen, out = set(), []
    for w in _weight_list(weights):
        if _packable(w) and id(w) not in seen and not is_packed(w):
            seen.add(id(w))
            out.append(w)
    return out


def pack_bytes(weights) -> int:
    """The bytes :func:`pack_weights` would add for ``weights`` (those not packed as they are now)."""
    return sum(w.numel() * w.element_size() for w in _unpacked(weights))


def _stamp(ws: tuple) -> tuple:
    return tuple((w._version, w.data_ptr()) for w in ws)


def _wanted(ws: tuple, quantize: bool) -> bool:
    """Whether ``ws`` (a tuple of weights) wants a pack: none as they are now, or (``quantize``) a
    float32 one where no search for their codes failed as they are now."""
    pk = _pack_of(ws)
    if pk is None:
        return True
    return quantize and not isinstance(pk, QuantizedWeight) and _NO_CODES.get(tuple(map(id, ws))) != _stamp(ws)


def _pack(groups: list[tuple], quantize: bool = False) -> int:
    """Pack each tuple of weights of ``groups`` (one weight, or several of one width stacked) that
    :func:`_wanted` one, where the pack's product of the probe row agrees with BLAS's (checked
    like onednn_works); a weight's older pack (alone or in another group) goes. ``quantize``: the
    pack is the weights' 4- or 8-bit codes where they are such codes (:mod:`genlm_bytes.lm.qgemm`),
    else oneDNN's. A packing that raises stops here. Returns the bytes packed."""
    made, op = 0, _onednn_op()
    with _PACK_LOCK:
        for ws in groups:
            if not _wanted(ws, quantize):
                continue
            try:
                stacked = ws[0].detach() if len(ws) == 1 else torch.cat([w.detach() for w in ws])
                pk = qgemm.quantized(stacked) if quantize else None
                if pk is None:
                    if quantize:
                        _NO_CODES[tuple(map(id, ws))] = _stamp(ws)
                    if _pack_of(ws) is not None:  # (packed already, and no codes)
                        continue
                    pk = torch.ops.mkldnn._reorder_linear_weight(stacked)
                del stacked
                y0 = torch.cat([_probe(w) for w in ws], dim=1)
                probe = _PROBES[ws[0].shape[1]]
                y = pk.product(probe) if isinstance(pk, QuantizedWeight) else op(probe, pk, None, "none", [], "")
                ok = y.shape == y0.shape and torch.allclose(y, y0, rtol=CHECK_TOLERANCE,
                                                             atol=CHECK_TOLERANCE * float(y0.abs().max()))
            except Exception:
                logger.debug("weights not packed: oneDNN's packing failed", exc_info=True)
                break
            if not ok:
                logger.debug("a packed weight %s multiplies differently from F.linear: not packed",
                             [tuple(w.shape) for w in ws])
                continue
            key = tuple(map(id, ws))
            for k in key:
                if k in _MEMBER:
                    _drop(_MEMBER[k])
            refs = tuple(weakref.ref(w, lambda r, key=key: _forget(key, r)) for w in ws)
            _PACKS[key] = (refs, tuple(w._version for w in ws), tuple(w.data_ptr() for w in ws), pk, y0,
                           tuple(w.shape[0] for w in ws))
            for k in key:
                _MEMBER[k] = key
            made += _nbytes(pk)
    if made:
        logger.debug("packed %d MB of weights (oneDNN's layout, or their codes)", made >> 20)
    return made


@torch.no_grad()
def pack_weights(weights, quantize: bool = False) -> int:
    """Make oneDNN's packed copy of every float32 CPU matrix of ``weights`` not packed as it is
    now, alone or in a group (others are skipped); ``linear_fn(packed=True)`` multiplies by them.
    ``quantize``: a matrix that is 4- or 8-bit codes (:func:`~genlm_bytes.lm.qgemm.quantized`) is
    packed as its codes instead, and a float32 pack of one alone replaced by them. Returns the
    bytes packed now. Does nothing (0) where :func:`onednn_works` is False."""
    weights = _weight_list(weights)
    if not onednn_works():
        return 0
    with _PACK_LOCK:
        # (with quantize, also weights in a float32 pack of their own: _pack replaces it by their codes)
        alone = [w for w in weights if quantize and _MEMBER.get(id(w)) == (id(w),) and is_packed(w)]
        return _pack([(w,) for w in _unpacked(weights) + alone], quantize)


@torch.no_grad()
def pack_groups(groups, quantize: bool = False) -> int:
    """Pack each group of float32 CPU matrices of one width (``groups``: tuples of weights that
    multiply the same input) as one matrix, their rows stacked, where not packed so as they are
    now: :func:`packed_group` gives it, ``linear_fn(packed=True).group`` multiplies by it. Their
    own packs are dropped (the group's holds the same numbers). A group whose stacked product of
    the probe row differs from its weights' own is not packed. ``quantize``: as
    :func:`pack_weights`'s. Returns the bytes packed now."""
    groups = [tuple(_weight_list(g)) for g in _weight_list(groups)]
    if not onednn_works():
        return 0
    return _pack([ws for ws in groups if len(ws) >= 2 and all(_packable(w) for w in ws)
                  and len({w.shape[1] for w in ws}) == 1 and len({id(w) for w in ws}) == len(ws)], quantize)


@torch.no_grad()
def changed_weights(weights) -> list[torch.Tensor]:
    """The weights among ``weights`` with a pack that no longer multiplies like them, though
    their version and address are the same: changed through ``.data`` (which torch's version
    counters do not see). Each is multiplied by a fixed row, as when it was packed: a change
    shows unless it moves that product by less than ``PROBE_TOLERANCE`` of its scale (less
    than a few roundings: the pack then multiplies as the weight does, to rounding). Their
    packs (a group's whole) are dropped (:func:`pack_weights`, :func:`pack_groups` make them
    again). Costs one matrix-vector product per weight."""
    out, named = [], {}
    with _PACK_LOCK:
        for w in _weight_list(weights):
            key = _MEMBER.get(id(w))
            if key is not None and not any(x is w for x in named.get(key, ())):
                named.setdefault(key, []).append(w)
        for key, asked in named.items():
            e = _PACKS.get(key)
            members = None if e is None else _members(e)
            if members is None:
                continue
            moved, at = [], 0
            for w, n in zip(members, e[5]):  # (each member's columns of the stacked probe product)
                y0 = e[4][:, at:at + n]
                at += n
                if float((_probe(w) - y0).abs().max()) > PROBE_TOLERANCE * float(y0.abs().max()):
                    moved.append(w)
            if moved:
                _drop(key)
                out.extend(w for w in asked if any(w is m for m in moved))
    return out


def _nbytes(pk) -> int:
    return pk.nbytes if isinstance(pk, QuantizedWeight) else pk.shape.numel() * 4


def packed_bytes() -> int:
    """The bytes of every packed copy alive."""
    return sum(_nbytes(e[3]) for e in list(_PACKS.values()) if all(r() is not None for r in e[0]))


def linear_fn(onednn: bool = True, packed: bool = False):
    """``linear(x, w, b=None)``: oneDNN's product where it applies and ``onednn`` is set and
    :func:`onednn_works`, else ``F.linear`` itself. ``packed``: by the packed copy of ``w``
    where :func:`pack_weights` made one (for every row count; see the module docstring)."""
    if not (onednn and onednn_works()):
        return F.linear
    op = _onednn_op()
    f32 = torch.float32
    top = ROW_BUCKETS[-1]

    def small(x2: torch.Tensor, w, b) -> torch.Tensor:
        """``x2`` (M, K), M <= SMALL_ROWS, by ``w`` as ``w @ x2.T``, M padded to an even count (MKL's
        path for one column is slower)."""
        m = x2.shape[0]
        if m % 2:
            x2 = torch.cat([x2, x2.new_zeros((1, x2.shape[1]))])
        y = torch.mm(w, x2.t()) if b is None else torch.addmm(b[:, None], w, x2.t())  # (N, M)
        return y.t()[:m].contiguous()

    def product(x2: torch.Tensor, w, b, pk=None) -> torch.Tensor:
        """``x2`` (M, K) by ``w`` (or its packed copy ``pk``), M rounded up to a bucket (at most ``top``)."""
        m = x2.shape[0]
        if pk is None and packed:
            pk = packed_weight(w)
        if isinstance(pk, QuantizedWeight):  # (any number of rows: no compiled kernels, no pieces)
            y = pk.product(x2.contiguous())
            return y if b is None else y.add_(b)
        if pk is not None:
            w = pk
        elif m <= SMALL_ROWS:
            return small(x2, w, b)
        n = ROW_BUCKETS[bisect.bisect_left(ROW_BUCKETS, m)]
        if n == m:
            return op(x2, w, b, "none", [], "")
        padded = x2.new_zeros((n, x2.shape[1]))
        padded[:m] = x2
        return op(padded, w, b, "none", [], "")[:m]

    def chunked(x2: torch.Tensor, w, b, pk=None) -> torch.Tensor:
        """:func:`product`, in pieces of at most ``top`` rows."""
        if pk is None and packed:
            pk = packed_weight(w)
        if x2.shape[0] <= top or isinstance(pk, QuantizedWeight):
            return product(x2, w, b, pk)
        return torch.cat([product(x2[i:i + top], w, b, pk) for i in range(0, x2.shape[0], top)])

    def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        if not (x.dtype is f32 and w.dtype is f32 and x.device.type == "cpu" and w.device.type == "cpu"
                and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))):
            return F.linear(x, w, b)
        k = x.shape[-1]
        x2 = x.reshape(-1, k)
        m = x2.shape[0]
        if m == 0:
            return F.linear(x, w, b)
        return chunked(x2, w, b).view(*x.shape[:-1], w.shape[0])

    def group(x: torch.Tensor, ws: tuple) -> torch.Tensor | None:
        """``x`` by the weights ``ws`` (no biases) at once: ``(..., sum of their widths)``, the
        products side by side, by their group's pack (:func:`pack_groups`); None where there is
        none as they are now (then multiply by each)."""
        pk = _pack_of(ws) if packed else None
        if pk is None or x.dtype is not f32 or x.device.type != "cpu" or torch.is_grad_enabled():
            return None
        k = x.shape[-1]
        x2 = x.reshape(-1, k)
        m = x2.shape[0]
        if m == 0:
            return None
        y = chunked(x2, None, None, pk)
        return y.view(*x.shape[:-1], y.shape[-1])

    linear.group = group
    linear.packed = packed  # (whether products use the packs: lm/fused.py runs only on them)
    return linear


def kernel_bytes(weights) -> int:
    """The most memory oneDNN's compiled kernels for products by ``weights`` can keep: every
    row bucket by every distinct weight shape."""
    shapes = {tuple(w.shape) for w in weights if w is not None and w.dim() == 2}
    return len(shapes) * len(ROW_BUCKETS) * KERNEL_BYTES
