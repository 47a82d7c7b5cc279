"""The cache object one pass runs with: per layer, the rows' pasts gathered with the new tokens.

A pass's model (transformers' or the lean decoder) calls ``cache.layers[i].update(k, v)`` once
per layer with the new tokens' keys/values and attends to what it returns: the layer's whole
keys/values (pasts + new). :class:`PassLayer` builds that buffer from the pasts' segments when
the layer runs. It also keeps what the :class:`~genlm_bytes.lm.hf.kv.KVStore` stores after the
pass: the new tokens alone, a context kept whole, or the arena written in place.

A batched pass gathers its rows' pasts for a group of layers at a time
(:meth:`_Gather._gathered`): the store keeps every layer of a block in one tensor (see
:meth:`~genlm_bytes.lm.prefix_cache.KVBlock.empty`), so one concatenation per group copies
every row's padding and segments, instead of one per row and layer. On a CPU the calls, not the
bytes, were the cost: 32 rows on 30 layers made 1,920 calls per pass. The groups are as large as
``chunk_bytes`` allows (16 MiB by default: 5-6 layers of 32 rows of ~50 tokens), so the
memory of a pass grows by a bounded amount, not with the layer count.

``update`` is also where a look-ahead pass is stopped (``check``: run once per layer, may
raise), so stopping needs no hook on the user's model.
"""

from __future__ import annotations

import functools

import torch

from genlm_bytes.lm.prefix_cache import KVBlock


def piece(t: torch.Tensor, row: int, start: int, n: int) -> torch.Tensor:
    """Slots ``[start, start + n)`` of row ``row`` of a block's ``(B, heads, T, d)`` tensor."""
    if t.shape[0] != 1:
        t = t[row:row + 1]
    return t if start == 0 and n == t.shape[2] else t.narrow(2, start, n)


class _Gather:
    """The gathering logic of :class:`PassLayer` (mixed into transformers' ``DynamicLayer``,
    which is imported late). ``workspace``: what the layers of one pass share (``layers``: their
    count, ``chunk_bytes``, and the buffers they fill)."""

    def setup(self, index: int, pasts, past: int, keep=(), arena=None, check=None, workspace=None):
        self.index, self.pasts, self.past, self.keep, self.arena = index, pasts, past, keep, arena
        self.check = check
        self.workspace = {} if workspace is None else workspace
        self.new_keys = self.new_values = None

    def get_seq_length(self) -> int:
        return self.past + (0 if self.new_keys is None else self.new_keys.shape[-2])

    def _begin(self, key_states, value_states) -> None:
        """What every layer's update does first: the stop check, transformers' bookkeeping, and
        the new tokens kept for the store."""
        if self.check is not None:
            self.check()
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.new_keys, self.new_values = key_states, value_states

    def update(self, key_states, value_states, *args, **kwargs):
        """``(B, hk, n, d)`` new keys/values -> the layer's ``(B, hk, past + n, d)`` keys/values."""
        self._begin(key_states, value_states)
        if self.arena is not None:
            return self._write_arena(key_states, value_states)
        P, i = self.past, self.index
        if P and len(self.pasts) > 1:  # a batch: its rows' pasts gathered by groups of layers
            return self._gathered(key_states, value_states)[0]
        if P == 0:
            K, V = key_states, value_states
        else:  # one row, no padding: one concatenation
            segs = self.pasts[0][0]
            K, V = self._buffers(key_states, P)
            torch.cat([piece(b.keys[i], r, s, n) for b, r, s, n in segs] + [key_states], dim=2, out=K)
            torch.cat([piece(b.values[i], r, s, n) for b, r, s, n in segs] + [value_states], dim=2, out=V)
        for row, lo, hi in self.keep:
            self._keep_whole(K[row:row + 1], V[row:row + 1], row, lo, hi)
        return K, V

    def update_buckets(self, key_states, value_states) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`update` for a pass whose rows (sorted by past length, longest first) are split
        into buckets ``workspace["buckets"]`` ``(r0, r1, Pb)``: rows ``[r0, r1)`` left-padded to
        ``Pb`` only. Returns per bucket its ``(r1 - r0, hk, Pb + n, d)`` keys and values."""
        self._begin(key_states, value_states)
        return self._gathered(key_states, value_states)

    def _buckets(self) -> list[tuple[int, int, int]]:
        """The pass's row ranges ``(r0, r1, Pb)``, each left-padded to its ``Pb``: the buckets of
        ``workspace["buckets"]``, else every row padded to the pass's past."""
        return self.workspace.get("buckets") or [(0, len(self.pasts), self.past)]

    def _gathered(self, key_states, value_states) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per bucket (:meth:`_buckets`), this layer's keys/values from the group of layers
        gathered with it (see :meth:`_gather_group`), the new tokens written after every row's
        past; the rows stored whole (``keep``) copied out."""
        i = self.index
        group = self.workspace.get("group")
        if group is None or not group[0] <= i < group[0] + group[1]:
            group = self.workspace["group"] = self._gather_group(key_states, value_states)
        a, _, KB, VB = group
        _, hk, n, d = key_states.shape
        hv, dv = value_states.shape[1], value_states.shape[3]
        out, at = [], 0
        for r0, r1, Pb in self._buckets():
            m = (r1 - r0) * (Pb + n)
            K = KB[i - a, at:at + m].view(r1 - r0, Pb + n, hk, d)
            V = VB[i - a, at:at + m].view(r1 - r0, Pb + n, hv, dv)
            at += m
            K[:, Pb:].copy_(key_states[r0:r1].transpose(1, 2))
            V[:, Pb:].copy_(value_states[r0:r1].transpose(1, 2))
            K, V = K.transpose(1, 2), V.transpose(1, 2)
            for row, lo, hi in self.keep:
                if r0 <= row < r1:
                    self._keep_whole(K[row - r0:row - r0 + 1], V[row - r0:row - r0 + 1], row, lo, hi)
            out.append((K, V))
        return out

    def _keep_whole(self, K, V, row: int, lo: int, hi: int) -> None:
        """This layer's slots ``[lo, hi)`` of row ``row`` (``K``, ``V``: its ``(1, hk, ·, d)`` keys
        and values) into the pass's stacked block of that context (``workspace["kept"][row]``),
        which the store keeps whole."""
        kept = self.workspace.setdefault("kept", {})
        if row not in kept:
            kept[row] = KVBlock.empty(self.workspace["layers"], K, V, 1, hi - lo)
        blk, i = kept[row], self.index
        blk.keys[i].copy_(K[:, :, lo:hi])
        blk.values[i].copy_(V[:, :, lo:hi])

    def _gather_group(self, key_states, value_states) -> tuple:
        """Layers ``[a, a + c)`` (``a``: this one) of every row, left-padded (to the pass's past, or
        to its bucket's: :meth:`_pads`), then room for the new tokens, in one concatenation each
        for keys and values: ``(a, c, KB, VB)``, ``KB`` ``(c, B * (past + n), hk * d)`` (the sum of
        the rows' lengths with buckets). ``c``: as many layers as fit ``chunk_bytes`` (one at
        least); the buffers are the pass's, reused by its next groups."""
        ws, a, P = self.workspace, self.index, self.past
        _, hk, n, d = key_states.shape
        Dk, Dv = hk * d, value_states.shape[1] * value_states.shape[3]
        T = P + n
        pads = self._pads()
        bufs = ws.get("group_bufs")
        if bufs is None:
            bufs = ws["group_bufs"] = self._group_buffers(key_states, value_states, sum(pads) + n * len(pads))
        c = min(bufs[0].shape[0], ws["layers"] - a)
        zk = key_states.new_zeros(()).expand(c, T, Dk)  # padding, and room for the new tokens
        zv = value_states.new_zeros(()).expand(c, T, Dv)
        kp, vp = [], []
        for (segs, p), pad in zip(self.pasts, pads):
            if p < pad:
                kp.append(zk[:, :pad - p])
                vp.append(zv[:, :pad - p])
            for blk, r, s, m in segs:
                kp.append(blk.stack[0][a:a + c, r, s:s + m])
                vp.append(blk.stack[1][a:a + c, r, s:s + m])
            kp.append(zk[:, :n])
            vp.append(zv[:, :n])
        KB, VB = bufs[0][:c], bufs[1][:c]
        torch.cat(kp, dim=1, out=KB)
        torch.cat(vp, dim=1, out=VB)
        return a, c, KB, VB

    def _buffers(self, key_states, P: int):
        """The ``(1, hk, P + n, d)`` key and value buffers a one-row pass's layer gathers into: the pass's
        workspace, shared by its layers (a layer's gathered keys/values are dead once its
        attention ran), so a pass allocates them once, not once per layer: a tensor above the
        mmap threshold (see ``fix_mmap_threshold``) is mapped fresh, and its first writes fault
        in every page."""
        shape = (key_states.shape[0], key_states.shape[1], P + key_states.shape[2], key_states.shape[3])
        bufs = self.workspace.get("gather")
        if bufs is None or bufs[0].shape != shape or bufs[0].dtype != key_states.dtype:
            bufs = self.workspace["gather"] = (key_states.new_empty(shape), key_states.new_empty(shape))
        return bufs

    def _pads(self) -> list[int]:
        """Per row, the past length it is left-padded to (its bucket's, :meth:`_buckets`)."""
        return [Pb for r0, r1, Pb in self._buckets() for _ in range(r0, r1)]

    def _group_buffers(self, key_states, value_states, slots: int):
        """The pass's ``(c, slots, heads * d)`` key and value buffers of :meth:`_gather_group`
        (``slots``: the rows' padded lengths, summed): ``c`` layers, as many as fit ``chunk_bytes``
        (one at least)."""
        ws = self.workspace
        Dk, Dv = key_states.shape[1] * key_states.shape[3], value_states.shape[1] * value_states.shape[3]
        per_layer = slots * (Dk + Dv) * key_states.element_size()
        c = max(1, min(ws["layers"], ws.get("chunk_bytes", 0) // per_layer))
        return key_states.new_empty((c, slots, Dk)), value_states.new_empty((c, slots, Dv))

    def _write_arena(self, key_states, value_states):
        P, i, n = self.past, self.index, key_states.shape[2]
        block, cap = self.arena
        fresh = block is None
        if fresh:
            block = self._new_arena(key_states, value_states, cap)
        K, V = block.keys[i], block.values[i]
        if fresh:  # a copy of the past first
            at = 0
            for blk, r, s, m in (self.pasts[0][0] if P else ()):
                K[:, :, at:at + m] = piece(blk.keys[i], r, s, m)
                V[:, :, at:at + m] = piece(blk.values[i], r, s, m)
                at += m
        self.new_keys, self.new_values = K.narrow(2, P, n), V.narrow(2, P, n)
        self.new_keys.copy_(key_states)
        self.new_values.copy_(value_states)
        return K.narrow(2, 0, P + n), V.narrow(2, 0, P + n)

    def _new_arena(self, key_states, value_states, cap: int) -> KVBlock:
        """The new stacked arena of ``cap`` slots this pass writes into (made by its first layer:
        ``workspace["arena"]``)."""
        ws = self.workspace
        if "arena" not in ws:
            ws["arena"] = KVBlock.empty(ws["layers"], key_states, value_states, 1, cap)
        return ws["arena"]


@functools.cache
def _pass_layer_class():
    from transformers.cache_utils import DynamicLayer

    class PassLayer(_Gather, DynamicLayer):
        """Layer ``index``'s cache for one pass on the pasts ``(segments, length)`` of its rows
        (see :meth:`KVRef.segments`), left-padded to ``past``. ``new_keys``/``new_values``: the
        new tokens alone (what the store keeps); ``workspace["kept"][row]``: the slots ``[lo, hi)``
        of the rows named in ``keep``, every layer. ``arena``: ``(block, 0)`` writes the one row's new tokens into
        that arena after its tip, ``(None, capacity)`` into a new arena (``workspace["arena"]``)
        after a copy of the past (see KVStore.arena_for)."""

        def __init__(self, index: int, pasts, past: int, keep=(), arena=None, check=None, ready=False,
                     workspace=None):
            super().__init__()
            self.is_initialized = ready  # (True: no transformers bookkeeping on the first update)
            self.setup(index, pasts, past, keep, arena, check, workspace)

    return PassLayer


def pass_layer(index: int, pasts, past: int, keep=(), arena=None, check=None, ready=False, workspace=None):
    """A :class:`PassLayer` (the class is made on first use: transformers imports late);
    ``workspace``: a dict the layers of one pass share (their gather buffers)."""
    return _pass_layer_class()(index, pasts, past, keep, arena, check, ready, workspace)


def make_pass_cache(model, n_layers: int | None, pasts, past: int, keep=(), arena=None, check=None,
                    chunk_bytes: int = 0, buckets=None):
    """The cache for one pass on ``pasts`` (per row ``(segments, length)``) left-padded to
    ``past``: a ``DynamicCache`` of :func:`pass_layer` s for the model's own forward, or
    (``n_layers`` given: the lean decoder's layer count) a plain :class:`LeanCache`.
    ``chunk_bytes``: the most a batched pass gathers at once (see ``_Gather._gather_group``).
    ``buckets``: ``(r0, r1, Pb)`` row ranges each padded to its own past (a lean pass's rows
    sorted by past length, longest first; see ``_Gather.update_buckets``)."""
    if n_layers is not None:
        from genlm_bytes.lm.lean import LeanCache

        ws = {"layers": n_layers, "chunk_bytes": chunk_bytes}
        if buckets:
            ws["buckets"] = list(buckets)
        return LeanCache([pass_layer(i, pasts, past, keep, arena, check, ready=True, workspace=ws)
                          for i in range(n_layers)], ws.get("buckets"))
    if buckets:
        raise ValueError("buckets need a lean pass (n_layers)")
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    ws = {"layers": len(cache.layers), "chunk_bytes": chunk_bytes}
    cache.layers = [pass_layer(i, pasts, past, keep, arena, check, workspace=ws) for i in range(len(cache.layers))]
    return cache
