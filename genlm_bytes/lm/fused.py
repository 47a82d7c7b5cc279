"""A lean pass of one row of a few new tokens in two C calls a layer.

With its products on the weights' codes (:mod:`genlm_bytes.lm.qgemm`), a one-token pass of the
embedded SmolLM2 spends about as long in the lean decoder's other work as in its products:
some 30 small torch calls a layer (norms, rotary embeddings, attention, SiLU, the residual
sums), each a few microseconds of dispatch for a few hundred floats. A decode step, a guess of
a few tokens and a small tree pass all have one row and a few new tokens. For them
:class:`FusedLayers` runs each layer as two calls of the codes kernel's library
(``fused.cpp``): the norm, the (q, k, v) product and the rotation; then, once the pass's cache
has taken the new keys and values and given the layer's back, attention, the output product,
the residual, the norm and the MLP. The cache's protocol is the same, so the engine's stores,
stops and arenas see nothing new.

Used only where every product of the pass is on codes, with no biases besides (the LLaMA
layer of :class:`~genlm_bytes.lm.lean.LeanDecoder`, not Gemma 3's), for one row of at most
:data:`MAX_TOKENS` new tokens; anything else runs the torch calls as before. Each step is the
operation those calls compute, in float32; only sums run in another order (a row of a pass
agrees with the torch calls' within ~1e-6 of its scale: ``tests/test_fused.py``).
``GENLM_BYTES_FUSED=0`` turns it off.
"""

from __future__ import annotations

import os

import torch

from genlm_bytes.lm import qgemm
from genlm_bytes.lm.gemm import _pack_of, packed_weight
from genlm_bytes.models.layers import attend, group_mask, merge_heads

MAX_TOKENS = 16  # new tokens of a pass it runs (a decode step, guesses, small tree passes)
MAX_SCORES = 1 << 16  # query heads x tokens x keys its own attention takes; more go to torch's (blocked) kernel


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

    def applies(self, x: torch.Tensor, buckets) -> bool:
        return (self.usable and not buckets and x.shape[0] == 1 and x.shape[1] <= MAX_TOKENS and x.dtype is torch.float32
                and x.device.type == "cpu" and qgemm.available() and enabled())

    def run(self, x, cos, sin, attention_mask, cache, before_layer) -> torch.Tensor | None:
        """``x`` (1, T, H) embedded tokens -> the last layer's output (1, T, H), or None (not on codes)."""
        tab = self.table()
        if tab is None:
            return None
        dec, lib = self.dec, qgemm._library()
        h, hk, d = dec.heads, dec.kv_heads, dec.head_dim
        _, T, H = x.shape
        x = x.contiguous().clone()  # (1, T, H): the residual stream, updated in place
        cos, sin = cos[0, 0].contiguous(), sin[0, 0].contiguous()  # (T, d)
        threads = torch.get_num_threads()
        mask = cmask = None
        row = tab.shape[1] * 8
        base = tab.data_ptr()
        for i, lw in enumerate(dec._weights):
            eps1, eps2 = float(lw[1]), float(lw[11])
            if before_layer is not None:
                before_layer()
            q = torch.empty(1, h, T, d)  # (1, h, T, d)
            kv = torch.empty(2, 1, hk, T, d)  # (k, v): (1, hk, T, d) each, kept by the cache
            rc = lib.lean_attn_in(base + i * row, x.data_ptr(), T, H, eps1, cos.data_ptr(), sin.data_ptr(),
                                  h, hk, d, q.data_ptr(), kv[0].data_ptr(), kv[1].data_ptr(), threads)
            if rc:
                raise ValueError("the fused layer does not take this model's shapes")
            K, V = cache.layers[i].update(kv[0], kv[1])  # (1, hk, L, d)
            L = K.shape[2]
            if i == 0:
                mask = dec._mask(attention_mask, 1, T, L, x.device)  # None or (1, 1, T, L)
                cmask = _additive(mask, T, L)
            o = None
            if h * T * L > MAX_SCORES:  # (long contexts: torch's blocked attention)
                o = merge_heads(attend(q, K, V, group_mask(mask, 1, dec.groups, T, L), dec.scaling)).contiguous()
            if K.stride(-1) != 1 or V.stride(-1) != 1:
                K, V = K.contiguous(), V.contiguous()
            rc = lib.lean_attn_out(base + i * row, x.data_ptr(), T, H, eps2, q.data_ptr(), h, hk, d,
                                   K.data_ptr(), K.stride(1), K.stride(2), V.data_ptr(), V.stride(1), V.stride(2), L,
                                   None if cmask is None else cmask.data_ptr(), dec.scaling,
                                   None if o is None else o.data_ptr(), self.inter, threads)
            if rc:
                raise ValueError("the fused layer does not take this model's shapes")
        return x


def _additive(mask, T: int, L: int) -> torch.Tensor | None:
    """``mask`` (None, or bool / additive broadcastable to ``(1, 1, T, L)``) as an additive float32
    ``(T, L)`` (hidden: -inf), or None (every key seen)."""
    if mask is None:
        return None
    m = mask.expand(1, 1, T, L)[0, 0]
    if m.dtype == torch.bool:
        return torch.zeros(T, L).masked_fill_(~m, float("-inf"))
    return m.to(torch.float32).contiguous()

