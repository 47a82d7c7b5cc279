"""The cache object one pass runs with: per layer, the rows' pasts gathered with the new tokens.

A pass's model (transformers' or the lean decoder) calls ``cache.layers[i].update(k, v)`` once
per layer with the new tokens' keys/values and attends to what it returns: the layer's whole
keys/values (pasts + new). :class:`PassLayer` builds that one buffer from the pasts' segments
when the layer runs and lets it go after, so one layer's pasts are copied at a time, not every
layer's. It also keeps what the :class:`~genlm_bytes.lm.hf.kv.KVStore` stores after the pass:
the new tokens alone, a context kept whole, or the arena written in place.

``update`` is also where a look-ahead pass is stopped (``check``: run once per layer, may
raise), so stopping needs no hook on the user's model.
"""

from __future__ import annotations

import functools

import torch


def piece(t: torch.Tensor, row: int, start: int, n: int) -> torch.Tensor:
    """Slots ``[start, start + n)`` of row ``row`` of a block's ``(B, heads, T, d)`` tensor."""
    if t.shape[0] != 1:
        t = t[row:row + 1]
    return t if start == 0 and n == t.shape[2] else t.narrow(2, start, n)


class _Gather:
    """The gathering logic of :class:`PassLayer` (mixed into transformers' ``DynamicLayer``,
    which is imported late)."""

    def setup(self, index: int, pasts, past: int, keep=(), arena=None, check=None, workspace=None):
        self.index, self.pasts, self.past, self.keep, self.arena = index, pasts, past, keep, arena
        self.check = check
        self.workspace = {} if workspace is None else workspace
        self.new_keys = self.new_values = None
        self.arena_kv = None
        self.kept = {}

    def get_seq_length(self) -> int:
        return self.past + (0 if self.new_keys is None else self.new_keys.shape[-2])

    def update(self, key_states, value_states, *args, **kwargs):
        """``(B, hk, n, d)`` new keys/values -> the layer's ``(B, hk, past + n, d)`` keys/values."""
        if self.check is not None:
            self.check()
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.new_keys, self.new_values = key_states, value_states
        if self.arena is not None:
            return self._write_arena(key_states, value_states)
        P, i = self.past, self.index
        if P == 0:
            K, V = key_states, value_states
        elif len(self.pasts) == 1:  # one row, no padding: one concatenation
            segs = self.pasts[0][0]
            K, V = self._buffers(key_states, P)
            torch.cat([piece(b.keys[i], r, s, n) for b, r, s, n in segs] + [key_states], dim=2, out=K)
            torch.cat([piece(b.values[i], r, s, n) for b, r, s, n in segs] + [value_states], dim=2, out=V)
        else:
            K, V = self._gather_padded(key_states, value_states)
        for row, lo, hi in self.keep:
            self.kept[row] = (K[row:row + 1, :, lo:hi].clone(), V[row:row + 1, :, lo:hi].clone())
        return K, V

    def _buffers(self, key_states, P: int):
        """The ``(B, hk, P + n, d)`` key and value buffers this layer gathers into: the pass's
        workspace, shared by its layers (a layer's gathered keys/values are dead once its
        attention ran), so a pass allocates them once, not once per layer: a large tensor is
        mapped fresh by the allocator (see ``fix_mmap_threshold``), and its first writes fault
        in every page."""
        shape = (key_states.shape[0], key_states.shape[1], P + key_states.shape[2], key_states.shape[3])
        bufs = self.workspace.get("gather")
        if bufs is None or bufs[0].shape != shape or bufs[0].dtype != key_states.dtype:
            bufs = self.workspace["gather"] = (key_states.new_empty(shape), key_states.new_empty(shape))
        return bufs

    def _gather_padded(self, key_states, value_states):
        """Every row's past left-padded to ``past`` slots, then the new tokens: per row, one
        concatenation of its segments and its new tokens, written in place after its padding
        (one call per row and layer instead of one small copy per segment). The padding is
        zeroed once per pass (the layers share the buffers and write only after it), and each
        row's place in the buffers is worked out once per pass."""
        i = self.index
        K, V = self._buffers(key_states, self.past)
        plan = self.workspace.get("plan")
        if plan is None or plan[0] is not K:
            plan = self.workspace["plan"] = (K, self._plan(K, V))
        ks, vs = key_states.split(1), value_states.split(1)
        for b, ((segs, _), (kout, vout)) in enumerate(zip(self.pasts, plan[1])):
            torch.cat([piece(blk.keys[i], r, s, m) for blk, r, s, m in segs] + [ks[b]], dim=2, out=kout)
            torch.cat([piece(blk.values[i], r, s, m) for blk, r, s, m in segs] + [vs[b]], dim=2, out=vout)
        return K, V

    def _plan(self, K, V) -> list:
        """Per row: where its past and new tokens go in the buffers ``K``/``V`` (after its
        padding, which is zeroed here: masked slots must hold finite numbers, since a weight
        of 0 times a NaN is NaN)."""
        P, out = self.past, []
        for b, (_, p) in enumerate(self.pasts):
            if p < P:
                K[b, :, :P - p].zero_()
                V[b, :, :P - p].zero_()
            out.append((K[b:b + 1, :, P - p:], V[b:b + 1, :, P - p:]))
        return out

    def _write_arena(self, key_states, value_states):
        P, i, n = self.past, self.index, key_states.shape[2]
        block, cap = self.arena
        if block is None:
            K = key_states.new_empty((1, key_states.shape[1], cap, key_states.shape[3]))
            V = value_states.new_empty(K.shape)
            at = 0
            for blk, r, s, m in (self.pasts[0][0] if P else ()):
                K[:, :, at:at + m] = piece(blk.keys[i], r, s, m)
                V[:, :, at:at + m] = piece(blk.values[i], r, s, m)
                at += m
            self.arena_kv = (K, V)
        else:
            K, V = block.keys[i], block.values[i]
        self.new_keys, self.new_values = K.narrow(2, P, n), V.narrow(2, P, n)
        self.new_keys.copy_(key_states)
        self.new_values.copy_(value_states)
        return K.narrow(2, 0, P + n), V.narrow(2, 0, P + n)


@functools.cache
def _pass_layer_class():
    from transformers.cache_utils import DynamicLayer

    class PassLayer(_Gather, DynamicLayer):
        """Layer ``index``'s cache for one pass on the pasts ``(segments, length)`` of its rows
        (see :meth:`KVRef.segments`), left-padded to ``past``. ``new_keys``/``new_values``: the
        new tokens alone (what the store keeps); ``kept[row]``: the slots ``[lo, hi)`` of the
        rows named in ``keep``. ``arena``: ``(block, 0)`` writes the one row's new tokens into
        that arena after its tip, ``(None, capacity)`` into a new arena buffer (``arena_kv``)
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


def make_pass_cache(model, n_layers: int | None, pasts, past: int, keep=(), arena=None, check=None):
    """The cache for one pass on ``pasts`` (per row ``(segments, length)``) left-padded to
    ``past``: a ``DynamicCache`` of :func:`pass_layer` s for the model's own forward, or
    (``n_layers`` given: the lean decoder's layer count) a plain :class:`LeanCache`."""
    if n_layers is not None:
        from genlm_bytes.lm.lean import LeanCache

        ws = {}
        return LeanCache([pass_layer(i, pasts, past, keep, arena, check, ready=True, workspace=ws)
                          for i in range(n_layers)])
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    ws = {}
    cache.layers = [pass_layer(i, pasts, past, keep, arena, check, workspace=ws) for i in range(len(cache.layers))]
    return cache
