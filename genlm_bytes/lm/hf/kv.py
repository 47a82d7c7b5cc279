"""The KV store: where a pass's keys and values go, and how much memory a pass may take.

:class:`KVStore` is the one owner of KV memory: it makes every :class:`KVBlock` (a pass's new
keys/values, an arena, a context kept whole, a tree pass's alternatives), points cached
prefixes at them (``KVRef`` chains in the :class:`PrefixCache`, which frees a block when no
chain holds it), and sizes passes to the memory budget (a pass reserves room for its
temporaries first, evicting what it must).

Three ways a pass's keys/values are stored:

- a *segment*: the pass's new tokens, chained to the past it ran on (a branch off a long
  context costs its own tokens only);
- *whole*: a context whose chain has grown long (see :meth:`KVStore.chain_full`) is copied into
  one block by its next pass, so later passes do not gather many small segments;
- an *arena*: a lone request's context with spare slots after it; the passes extending exactly
  that context write in place (sequential generation stays one segment).

Not handled: models whose cache layers are neither plain full-attention layers nor sliding-window
layers under SDPA (the backend turns KV reuse off for them; see :func:`plain_cache`).
"""

from __future__ import annotations

import math

from genlm_bytes.lm.prefix_cache import KVBlock, KVRef, PrefixCache


class KVStore:
    """Stores passes' keys/values in ``cache`` and sizes passes to its budget.

    Args:
        cache: the :class:`PrefixCache` (log-probs and pasts under one budget).
        config: the :class:`~genlm_bytes.lm.hf.config.EngineConfig`.
        model: the transformers model (its config gives the KV size per token and the
            activation sizes of a pass).
        kv_reuse: whether pasts are kept at all.
        vocab_size: rows of log-probs a pass outputs are this long.
        reserve: bytes of the budget always kept free besides a pass's temporaries (the
            byte-level working set and the allocator's share).
    """

    def __init__(self, cache: PrefixCache, config, model, kv_reuse: bool, vocab_size: int, reserve: int):
        self.cache, self.config, self.kv_reuse, self.vocab_size = cache, config, kv_reuse, vocab_size
        self.base_reserve = reserve
        self.logits_reserved = 0  # bytes of the pass runner's logits buffer (see pass_bytes)
        self.logits_buffered = False  # whether passes log-softmax their logits in place (the runner says)
        self.logits_chunk = config.logp_chunk  # rows of such a chunk (the runner says)
        self.max_positions = getattr(model.config, "max_position_embeddings", None)
        self.kv_per_token = kv_bytes_per_token(model)  # (0: measured by the first pass)
        cfg = model.config  # (transformers' config attributes are slow to read on a hot path)
        self.dims = (getattr(cfg, "hidden_size", 0) or 0, getattr(cfg, "num_attention_heads", 1) or 1,
                     getattr(cfg, "num_hidden_layers", 1) or 1)
        cache.reserve(reserve)

    # ------------------------------------------------------------------ sizing passes
    def pass_bytes(self, rows: int, kv_len: int, n_new: int, n_out: int, whole: int = 0) -> int:
        """Estimated temporary memory of a pass: one layer's padded pasts (a group of layers' for
        a batched pass), the new keys/values of every layer, contexts kept whole (``whole``
        tokens), activations of the new tokens, the
        attention mask, and log-probs (with their copies) of ``n_out`` positions; the attention
        scores and weights of one layer (every head), and the float mask."""
        hidden, heads, layers = self.dims
        kv = self.kv_per_token
        gathered = rows * kv_len * kv // layers  # one layer's padded pasts ...
        if rows > 1:  # ... or a group of layers (see pass_cache._Gather._gather_group)
            gathered = max(gathered, min(gathered * layers, self.config.gather_chunk_bytes))
        # Logits of a chunk: log-softmaxed in place (in the runner's buffer, which stays as large
        # as the largest chunk before, or fresh); else a chunk's logits and their log-softmax.
        if self.logits_buffered:
            logits = max(min(n_out, self.logits_chunk) * self.vocab_size * 4, self.logits_reserved)
        else:
            logits = 2 * min(n_out, self.config.logp_chunk) * self.vocab_size * 4 + self.logits_reserved
        return (gathered + (rows * n_new + whole) * kv
                + rows * n_new * (16 * 4 * hidden + 4 * kv_len * (2 * heads + 1)) + logits)

    def pass_tokens(self, past: int, most: int) -> int:
        """How many new tokens (at most ``most``, at least 16) one pass on a past of ``past``
        tokens may run with its temporaries within ``pass_share`` of the budget."""
        cap = self.config.pass_share * self.cache.budget_bytes
        n = most
        while n > 16 and self.pass_bytes(1, past + n, n, n) > cap:
            n = max(16, n * 3 // 4)
        return n

    def memory_groups(self, rows: list) -> list[list]:
        """``rows`` ``(ids, ref, past length)`` split into passes whose temporaries (every row's
        past left-padded to the longest, its new tokens right-padded) fit ``pass_share``."""
        if not rows:
            return []
        cap = self.config.pass_share * self.cache.budget_bytes
        rows = sorted(rows, key=lambda r: r[2])
        groups, cur = [], []
        past = new = 0
        for r in rows:
            p, n = max(past, r[2]), max(new, len(r[0]) - r[2])
            if cur and self.pass_bytes(len(cur) + 1, p + n, n, len(cur) + 1) > cap:
                groups.append(cur)
                cur, p, n = [], r[2], len(r[0]) - r[2]
            cur.append(r)
            past, new = p, n
        groups.append(cur)
        return groups

    def reserve_pass(self, rows: int, kv_len: int, n_new: int, n_out: int, keep=(), arena=None) -> None:
        """Make room in the budget for a pass's temporaries (``keep``: slots kept whole;
        ``arena``: a new arena's capacity, see :meth:`arena_for`)."""
        whole = sum(hi - lo for _, lo, hi in keep) + (arena[1] if arena and arena[0] is None else 0)
        self.cache.reserve(self.base_reserve + self.pass_bytes(rows, kv_len, n_new, n_out, whole))

    def end_pass(self, block: KVBlock | None, n_tokens: int) -> None:
        """Release the pass's reservation (and learn the KV size per token from its block)."""
        if block is not None and not self.kv_per_token and n_tokens:
            self.kv_per_token = block.nbytes // n_tokens
        self.cache.reserve(self.base_reserve)

    # ------------------------------------------------------------------ where KV goes
    def chain_full(self, ref: KVRef | None, short: bool = False) -> bool:
        """Whether a context on the past ``ref`` is stored whole by its pass: its chain has
        ``max_segments`` segments or, ``short``, from ``min_segments`` on a short past (more on a
        long one). Each pass gathers every segment of its rows' pasts (two copies per segment
        and layer), while storing a context whole copies its past once: the two balance near
        sqrt(past / 16) segments on a CPU. Short chains are for generation (contexts growing a
        token at a time, several per pass); scoring keeps long chains, whose whole copies would
        crowd a small cache budget.

        Never when the past and its copy would not fit the budget together: the pass reserves
        room for the copy, which would evict the very past it copies, and every later pass
        would run the whole context again (a 2,000-token generation at a 128 MB budget did so
        from 1,450 tokens on). The chain grows a segment per pass instead."""
        if ref is None:
            return False
        if 2 * ref.depth * self.kv_per_token + self.base_reserve > self.cache.budget_bytes:
            return False
        cfg = self.config
        limit = (min(cfg.max_segments, max(cfg.min_segments, math.isqrt(ref.depth // 16))) if short
                 else cfg.max_segments)
        return ref.nseg >= limit

    def arena_for(self, ref: KVRef | None, p: int, n: int, grow: bool):
        """Where a one-row pass of ``n`` tokens on the past ``ref`` (``p`` tokens) puts its keys
        and values: ``(arena, 0)`` to write them in place after the arena's tip that ``ref`` is;
        ``(None, capacity)`` for a new arena (``grow``: a lone request's pass, when the arena
        fits ``arena_budget_share`` of the budget); None for a block of its own."""
        cfg = self.config
        if not self.kv_reuse:
            return None
        if ref is not None and ref.block.tip_room(ref, n):
            return ref.block, 0
        if not grow or cfg.arena_spare_min <= 0:
            return None
        cap = p + n + max(cfg.arena_spare_min, int((p + n) * cfg.arena_spare_share))
        if self.max_positions:
            cap = min(cap, max(self.max_positions, p + n))
        if self.kv_per_token and cap * self.kv_per_token > cfg.arena_budget_share * self.cache.budget_bytes:
            return None
        return None, cap

    def arena_block(self, layers, arena, filled: int) -> KVBlock:
        """The arena a pass wrote into (made from its layers' stacked buffer if new), its tip moved
        to ``filled``."""
        block = arena[0]
        if block is None:
            block = layers[0].workspace.pop("arena")
        block.filled = filled
        return block

    def point_at_arena(self, nodes, block: KVBlock, new: bool) -> None:
        """Point ``nodes`` (a context's, from depth 1) at ``block``'s slots. A new arena also
        takes over the prefix the pass ran on (which it holds a copy of), so the segments or
        the arena that prefix came from are freed unless other contexts still hold them."""
        put = self.cache.repoint_kv if new else self.cache.put_kv
        put(nodes, lambda node: KVRef(block, 0, 0, node.depth))

    def new_block(self, layers) -> KVBlock:
        """The new tokens' keys/values of a pass (every row) as one stacked block."""
        n = layers[0].new_keys.shape[-2]
        return stack_layers(_take_new(layers), [(0, n)])[0]

    def put_segment(self, nodes, block: KVBlock, row: int, start: int, base: int, prev, layers=None) -> None:
        """Point ``nodes`` (depths ``base + 1, ...``) at slots ``start, ...`` of ``row`` of ``block``,
        chained to ``prev``. A chain the pass kept whole (``layers``: the pass's cache layers,
        see :class:`~genlm_bytes.lm.hf.pass_cache.PassLayer`) is stored as one block instead."""
        whole = layers[0].workspace.get("kept", {}).get(row) if layers else None
        if whole is not None:
            self.cache.put_kv(nodes, lambda node: KVRef(whole, 0, 0, node.depth))
        else:
            self.cache.put_kv(nodes, lambda node: KVRef(block, row, start, node.depth - base, prev))

    def store_tree(self, ids, P, ref, tail, slots, layers, arena, path_block, alt_block, logp_rows,
                    row: int = 0) -> None:
        """Point every new prefix of a tree pass at its slots (chained to the past it attended
        to) and cache its log-probs. ``alt_block`` None: the alternatives' slots follow the
        path's in ``path_block`` (row ``row``: a ragged tree pass, see ``PassRunner.tree_rows``)."""
        store, cache = self, self.cache

        def at(s: int) -> tuple[KVBlock, int]:  # where slot ``s`` of the pass is stored
            return (path_block, s) if s < tail or alt_block is None else (alt_block, s - tail)

        def path_ref(depth: int) -> KVRef | None:  # the past of ids[:depth], depth <= P + tail
            if arena:  # (a new arena holds a copy of the past too)
                return KVRef(path_block, 0, 0, depth) if depth else None
            if depth <= P:
                return ref.prefix(depth) if ref is not None else None
            return KVRef(path_block, row, 0, depth - P, ref)

        prevs, ctxs = [], []
        for e, (i, chain, s, parent, k) in enumerate(slots):
            if parent >= 0:
                pi, _, ps = slots[parent][:3]
                ctx = ctxs[parent][:pi + k] + chain
                prev = prevs[parent]
                if k:
                    blk, start = at(ps)
                    prev = KVRef(blk, row if blk is path_block else 0, start, k, prev)
            else:
                ctx = ids[:i] + chain
                prev = ref if e == 0 else path_ref(i)
            prevs.append(prev)
            ctxs.append(ctx)
            if not chain and not (e == 0 and arena and arena[0] is None):
                continue
            nodes = cache.walk(ctx, create=True)
            if e == 0 and arena:
                store.point_at_arena(nodes if arena[0] is None else nodes[i:], path_block, arena[0] is None)
            else:
                # Only the path's slots hold a whole past in the buffer (an item's ancestors are spread).
                blk, start = at(s)
                store.put_segment(nodes[i:], blk, row if blk is path_block else 0, start, i, prev,
                                  layers if e == 0 else None)
            for j, node in enumerate(nodes[i:]):
                cache.put_logp(ctx[: i + j + 1], next(logp_rows), node=node)

    def split_spans(self, layers, spans: list[tuple[int, int]]) -> list[KVBlock]:
        """The new keys/values of a pass as one block per slot span ``[lo, hi)`` of its row (each
        frees on its own; see :meth:`split_block`)."""
        return stack_layers(_take_new(layers), spans)

    def split_block(self, layers, tail: int, arena: bool = False) -> tuple[KVBlock | None, KVBlock | None]:
        """The new keys/values of a tree pass as two blocks: the path's slots ``[0, tail)`` and the
        alternatives' (each its own stacked copy). The cache frees a
        block when no cached chain holds it: the path (which the beam follows) outlives most
        alternatives, which must not keep their memory with it, nor the reverse. ``arena``: the
        pass wrote into an arena, which keeps the path (None here); the alternatives are copied out."""
        n = layers[0].new_keys.shape[-2]
        if arena:
            if tail == n:
                return None, None
            return None, stack_layers(_take_new(layers), [(tail, n)])[0]
        if tail == n or tail == 0:
            block = self.new_block(layers)
            return (block, None) if tail else (None, block)
        path, alt = stack_layers(_take_new(layers), [(0, tail), (tail, n)])  # (each frees on its own)
        return path, alt


def _take_new(layers) -> list:
    """The pass's new keys/values per layer, taken from its layers (so that copying them frees
    them one layer at a time)."""
    out = [(lay.new_keys, lay.new_values) for lay in layers]
    for lay in layers:
        lay.new_keys = lay.new_values = None
    return out


def stack_layers(pairs: list, spans: list[tuple[int, int]]) -> list[KVBlock]:
    """Stacked blocks (see :meth:`KVBlock.empty`) of slots ``[lo, hi)`` of per-layer ``(k, v)``
    pairs ``(B, heads, T, d)``, one per span. ``pairs`` is emptied as it is copied, one layer at
    a time, so the originals go as their copies are made (a block's memory is not held twice)."""
    k0, v0 = pairs[0]
    outs = [KVBlock.empty(len(pairs), k0, v0, k0.shape[0], hi - lo) for lo, hi in spans]
    del k0, v0
    for i in range(len(pairs)):
        k, v = pairs[i]
        pairs[i] = None
        for blk, (lo, hi) in zip(outs, spans):
            blk.keys[i].copy_(k[:, :, lo:hi])
            blk.values[i].copy_(v[:, :, lo:hi])
        del k, v
    return outs


def kv_bytes_per_token(model) -> int:
    """Bytes of keys and values per token, from the model's config (0 if it does not say)."""
    cfg = getattr(model, "config", None)
    try:
        layers = int(cfg.num_hidden_layers)
        heads = int(getattr(cfg, "num_attention_heads", 0) or 0)
        kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
        size = next(model.parameters()).element_size()
    except (AttributeError, TypeError, ValueError, ZeroDivisionError, StopIteration):
        return 0
    return 2 * layers * kv_heads * head_dim * size


def plain_cache(model) -> bool:
    """Whether KV reuse works for the model: its cache layers are plain full-attention layers, or
    sliding-window layers under SDPA (the engine keeps their whole past and masks the window: see
    :mod:`~genlm_bytes.lm.hf.attention`)."""
    try:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

        cache = DynamicCache(config=model.config)
        kinds = {type(lay) for lay in cache.layers}
        if not cache.layers or not kinds <= {DynamicLayer, DynamicSlidingWindowLayer}:
            return False
        if DynamicSlidingWindowLayer in kinds:
            cfg = model.config
            window = getattr(cfg, "sliding_window", None)
            return (isinstance(window, int) and window > 0
                    and getattr(cfg, "_attn_implementation_internal", None) == "sdpa")
        return True
    except Exception:  # noqa: BLE001 - unknown architectures simply run without KV reuse
        return False
