"""A lean pass in three C calls a layer.

With its products on the weights' codes (:mod:`genlm_bytes.lm.qgemm`), a one-token pass of the
embedded SmolLM2 spent about as long in the lean decoder's other work as in its products: some
30 small torch calls a layer (norms, rotary embeddings, attention, SiLU, the residual sums),
each a few microseconds of dispatch for a few hundred floats. :class:`FusedLayers` runs each
layer of a pass (decode steps, guesses, tree passes, a batch of beams' next tokens, a
prefill's chunks) as three calls of the codes kernel's library (``fused.cpp``): the norm, the (q, k, v) product and the rotation; then, once the pass's cache
has taken the new keys and values and given the layer's back, attention row by row (one call
per bucket of a batched pass); then the output product, the residual, the norm and the MLP.
The cache's protocol is the same, so the engine's stores, stops, arenas and buckets see
nothing new.

Used only where every product of the pass is on codes, with no biases besides (the LLaMA
layer of :class:`~genlm_bytes.lm.lean.LeanDecoder`, not Gemma 3's), for at most
:data:`MAX_TOKENS` new tokens a row; anything else runs the torch calls as before. Its buffers
stay with the model's thread (512 tokens: about 12 MB). Each step is the operation those
calls compute, in float32; only sums run in another order (the hidden
states agree with the torch calls' within ~1e-6 of their scale: ``tests/test_fused.py``).
Measured (benchmarks/README.md, session 27): a one-token pass 0.57x the torch calls' time;
greedy over 68 prompts 0.80x (geometric mean), the same bytes; 32 beams' passes of 8 rows or
more 0.79x the time per row; prefill of 23 texts 0.95x. ``GENLM_BYTES_FUSED=0`` turns it off.
"""

from __future__ import annotations

import os

import torch

from genlm_bytes.lm import qgemm
from genlm_bytes.lm.gemm import _pack_of, packed_weight
from genlm_bytes.models.layers import attend, group_mask, merge_heads

MAX_TOKENS = 1024  # new tokens a row of a pass it runs (a long text's passes take 512 at most: every pass)
# Scores (rows x query heads x tokens x keys) its own attention takes for 3 tokens or more; more go to
# torch's blocked kernel (2 threads: one token a row, its own took 0.55-0.78x torch's time at 64-4,096
# keys; 4 tokens on 1,024 keys 1.2x, on 256 0.9x; benchmarks/README.md, session 27)
MAX_SCORES = 1 << 15


def enabled() -> bool:
    """Whether ``GENLM_BYTES_FUSED`` leaves fused layers on (unset or ``1``; ``0``: off)."""
    v = os.environ.get("GENLM_BYTES_FUSED", "1")
    if v not in ("", "0", "1"):
        raise ValueError(f"GENLM_BYTES_FUSED must be 0 or 1, got {v!r}")
    return v != "0"


def _codes(tab: list, qw) -> None:
    tab += [qw.codes.data_ptr(), qw.scale.data_ptr(), qw.offset.data_ptr()]


class FusedLayers:
    """The fused path of a :class:`~genlm_bytes.lm.lean.LeanDecoder` (``decoder``): :meth:`run`
    gives a pass's hidden states before the final norm, or None where it does not apply."""

    def __init__(self, decoder):
        self.dec = decoder
        w = decoder._weights
        # (biases anywhere, or layers without stacked groups: not this path)
        self.usable = bool(w) and all(b is None for lw in w for b in (lw[3], lw[5], lw[7], lw[9], lw[13], lw[15], lw[17])) \
            and all(decoder._groups) and getattr(decoder.linear, "packed", False)
        self.inter = int(w[0][12].shape[0]) if w else 0
        self._key = None
        self._table = None
        self._refs = None

    def _packs(self) -> list | None:
        """Per layer the packs of (q, k, v), o, (gate, up) and down as they are now, if all are codes."""
        out = []
        for (qkv, gu), lw in zip(self.dec._groups, self.dec._weights):
            packs = (_pack_of(qkv), packed_weight(lw[8]), _pack_of(gu), packed_weight(lw[16]))
            if not all(isinstance(p, qgemm.QuantizedWeight) for p in packs):
                return None
            out.append(packs)
        return out

    def table(self) -> torch.Tensor | None:
        """The layers' table (``fused.cpp``'s order: pointers and shapes), rebuilt when a pack or a
        norm's weight changed; None where some product is not on codes."""
        packs = self._packs()
        if packs is None:
            return None
        norms = [(lw[0], lw[10]) for lw in self.dec._weights]
        key = tuple(id(p) for ps in packs for p in ps) + tuple((n.data_ptr(), n._version) for ns in norms for n in ns)
        if key != self._key:
            rows = []
            for (qkv, o, gu, down), (n1, n2) in zip(packs, norms):
                tab = [n1.data_ptr()]
                _codes(tab, qkv)
                tab += [qkv.shape[0], qkv.bits]
                _codes(tab, o)
                tab += [o.bits, n2.data_ptr()]
                _codes(tab, gu)
                tab += [gu.shape[0], gu.bits]
                _codes(tab, down)
                tab += [down.bits]
                rows.append(tab)
            self._table, self._key = torch.tensor(rows, dtype=torch.int64), key
            self._refs = (packs, norms)  # (what the pointers point into stays alive with the table)
        return self._table

    def applies(self, x: torch.Tensor) -> bool:
        return (self.usable and x.shape[1] <= MAX_TOKENS and x.dtype is torch.float32 and x.device.type == "cpu"
                and qgemm.available() and enabled())

    def run(self, x, cos, sin, attention_mask, cache, before_layer) -> torch.Tensor | None:
        """``x`` (B, T, H) embedded tokens -> the last layer's output (B, T, H), or None (not on codes).
        ``cache``: the pass's (``layers[i].update``; with ``buckets``, ``update_buckets``: see
        :class:`~genlm_bytes.lm.lean.LeanCache`)."""
        tab = self.table()
        if tab is None:
            return None
        dec, lib = self.dec, qgemm._library()
        h, hk, d = dec.heads, dec.kv_heads, dec.head_dim
        B, T, H = x.shape
        x = x.clone(memory_format=torch.contiguous_format)  # (B, T, H): the residual stream, updated in place
        cos, sin = cos[:, 0].contiguous(), sin[:, 0].contiguous()  # (B, T, d)
        q = torch.empty(B, h, T, d)  # (B, h, T, d): a layer's queries
        o = torch.empty(B, T, h * d)  # (B, T, h * d): the attention's output, row by row
        threads = torch.get_num_threads()
        buckets = getattr(cache, "buckets", None)
        masks = None
        row = tab.shape[1] * 8
        base = tab.data_ptr()
        for i, lw in enumerate(dec._weights):
            if before_layer is not None:
                before_layer()
            kv = torch.empty(2, B, hk, T, d)  # (k, v): (B, hk, T, d) each, kept by the cache
            _check(lib.lean_attn_in(base + i * row, x.data_ptr(), B, T, H, float(lw[1]), cos.data_ptr(),
                                    sin.data_ptr(), h, hk, d, q.data_ptr(), kv[0].data_ptr(), kv[1].data_ptr(),
                                    threads))
            if buckets:
                kvs = cache.layers[i].update_buckets(kv[0], kv[1])  # per bucket (n, hk, Pb + T, d)
            else:
                kvs = [cache.layers[i].update(kv[0], kv[1])]  # (B, hk, L, d)
            if masks is None:
                masks = self._masks(attention_mask, buckets, kvs, T)
            for (r0, r1, _), (K, V), m in zip(buckets or [(0, B, 0)], kvs, masks):
                self._attend(lib, q[r0:r1], K, V, m, o[r0:r1], threads)
            _check(lib.lean_attn_out(base + i * row, x.data_ptr(), B * T, H, float(lw[11]), o.data_ptr(), h * d,
                                     self.inter, threads))
        return x

    def _masks(self, attention_mask, buckets, kvs, T: int) -> list:
        """Per bucket (or for the whole batch) ``(torch, mask)``: whether its attention is torch's
        (:func:`_by_torch`) and its mask in that one's form, grouped for :func:`attend`, or
        additive ``(n, T, L)`` for the C one (None: every key seen)."""
        dec = self.dec
        if buckets:
            ms = dec._bucket_masks(attention_mask, buckets, T, kvs[0][0].device, grouped=False)
            sizes = [(r1 - r0, K.shape[2]) for (r0, r1, _), (K, _) in zip(buckets, kvs)]
        else:
            n, L = kvs[0][0].shape[0], kvs[0][0].shape[2]
            ms, sizes = [dec._mask(attention_mask, n, T, L, kvs[0][0].device)], [(n, L)]
        out = []
        for m, (n, L) in zip(ms, sizes):
            torch_ = _by_torch(n, dec.heads, T, L)
            out.append((torch_, group_mask(m, n, dec.groups, T, L) if torch_ else _additive(m, n, T, L)))
        return out

    def _attend(self, lib, q, K, V, m, o, threads) -> None:
        """Attention of rows ``q`` (n, h, T, d) on their keys and values (n, hk, L, d) into ``o``
        (n, T, h * d); ``m``: from :meth:`_masks`."""
        dec = self.dec
        n, h, T, d = q.shape
        torch_, mask = m
        if torch_:
            o.copy_(merge_heads(attend(q, K, V, mask, dec.scaling)))
            return
        if K.stride(-1) != 1 or V.stride(-1) != 1:
            K, V = K.contiguous(), V.contiguous()
        _check(lib.lean_attend(q.data_ptr(), n, T, h, dec.kv_heads, d, K.data_ptr(), K.stride(0), K.stride(1),
                               K.stride(2), V.data_ptr(), V.stride(0), V.stride(1), V.stride(2), K.shape[2],
                               None if mask is None else mask.data_ptr(), dec.scaling, o.data_ptr(), threads))


def _by_torch(n: int, h: int, T: int, L: int) -> bool:
    """Whether the attention of ``n`` rows of ``T`` tokens on ``L`` keys runs in torch's blocked
    kernel (3 tokens or more a row, above :data:`MAX_SCORES` scores) rather than the C one."""
    return T > 2 and n * h * T * L > MAX_SCORES


def _check(rc: int) -> None:
    if rc:
        raise ValueError("the fused layers do not take this model's shapes")


def _additive(mask, n: int, T: int, L: int) -> torch.Tensor | None:
    """``mask`` (None, or bool / additive broadcastable to ``(n, 1, T, L)``) as an additive float32
    ``(n, T, L)`` (hidden: -inf), or None (every key seen)."""
    if mask is None:
        return None
    m = mask.expand(n, 1, T, L)[:, 0]
    if m.dtype == torch.bool:
        return torch.zeros(n, T, L).masked_fill_(~m, float("-inf"))
    return m.to(torch.float32).contiguous()
