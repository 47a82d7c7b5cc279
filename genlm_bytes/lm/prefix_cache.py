"""Prefix cache of next-token log-probs and KV segments, under a memory budget.

Contexts are token-id sequences; they share prefixes, so the cache is a trie
of :class:`Node` (one per token position). A node may hold

- ``logp``: the next-token log-probs ``(V,)`` after its prefix, and/or
- ``kv``: a :class:`KVRef`, the past (keys/values) of its prefix as a chain of
  segments of :class:`KVBlock` s. A forward pass keeps only the keys/values
  of its new tokens (one block); every new prefix points into that block,
  chained to the past the pass ran on. So a branch off a long context costs
  the memory of its own tokens, not a copy of the context.

Memory: every payload is charged to the budget (a block once, however many
chains hold it). When the total goes over ``budget_bytes``, the least
recently used payloads are dropped; a block is freed when no cached chain
holds it. A node's log-probs and its past are evicted separately. Log-probs
handed to a reader who keeps them (``held=True``) go to the evicting end: the
reader holds them, and rows computed ahead of need (a prefill's look-ahead)
must outlive the rows already consumed.
A node left with neither payload nor children is unlinked from the trie and
marked ``pruned``; an insert through a node walked before that eviction goes to
the live node of the same prefix instead (else its payload would be charged
but unreachable, and evicting it later could unlink a live sibling).

Thread safety: all methods take ``self.lock``; the backend calls them from the
event loop (lookups) and from its worker thread (inserts).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch


class KVBlock:
    """Keys and values a forward pass computed: per layer ``(B, kv_heads, T, head_dim)``.

    An *arena* (``filled`` not None) is a one-row block holding a whole context in slots
    ``[0, filled)`` with room after them: a pass extending exactly that context (its *tip*)
    writes its new keys/values in place, so a sequence generated token by token stays in one
    segment (no gathering of a chain of segments on every pass). Slots below ``filled`` never
    change; those at and after it belong to no cached context.

    A *stacked* block (:meth:`empty`) holds every layer in one tensor per keys and values,
    ``(layers, B, T, kv_heads * head_dim)``; ``keys[i]``/``values[i]`` are views of it. A
    batched pass gathers its rows' pasts from stacked blocks several layers per copy (see
    ``lm/hf/pass_cache.py``).
    """

    __slots__ = ("__weakref__", "filled", "keys", "nbytes", "refs", "stack", "values")

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], filled: int | None = None,
                 stack: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.keys = keys
        self.values = values
        self.nbytes = sum(k.numel() * k.element_size() for k in keys) * 2
        self.refs = 0  # cached refs whose chain holds this block (charged to the budget while > 0)
        self.filled = filled
        self.stack = stack  # (K, V), each (layers, B, T, kv_heads * head_dim), or None

    @classmethod
    def empty(cls, n_layers: int, k: torch.Tensor, v: torch.Tensor, B: int, T: int) -> KVBlock:
        """A new stacked block of ``n_layers`` layers, ``B`` rows and ``T`` slots, its heads, head
        size, dtype and device those of the keys ``k`` and values ``v`` ``(·, heads, ·, d)``."""
        K = k.new_empty((n_layers, B, T, k.shape[1] * k.shape[3]))
        V = v.new_empty((n_layers, B, T, v.shape[1] * v.shape[3]))
        return cls(layer_views(K, k.shape[1]), layer_views(V, v.shape[1]), stack=(K, V))

    def tip_room(self, ref: KVRef, n: int) -> bool:
        """Whether ``ref`` (a past held in this block) is this arena's whole written context
        and ``n`` more slots fit after it."""
        return (self.filled is not None and ref.prev is None and ref.start == 0
                and ref.length == self.filled and self.filled + n <= self.keys[0].shape[2])


def layer_views(S: torch.Tensor, heads: int) -> list[torch.Tensor]:
    """Per layer, the ``(B, heads, T, head_dim)`` view of a stacked ``(layers, B, T, heads *
    head_dim)`` tensor."""
    _, B, T, D = S.shape
    return [x.view(B, T, heads, D // heads).transpose(1, 2) for x in S.unbind(0)]


class KVRef:
    """The past of a prefix as a chain of segments.

    Positions ``[depth - length, depth)`` are slots ``[start, start + length)`` of row ``row``
    of ``block``; the earlier positions are the past of ``prev`` (None: nothing before). A pass
    run on a cached past stores only the keys/values of its new tokens, so branches off one
    context share that context's segments instead of copying them.
    """

    __slots__ = ("block", "depth", "length", "nseg", "prev", "row", "start")

    def __init__(self, block: KVBlock, row: int, start: int, length: int, prev: KVRef | None = None):
        self.block = block
        self.row = row
        self.start = start
        self.length = length
        self.prev = prev
        self.depth = length + (prev.depth if prev is not None else 0)
        self.nseg = 1 + (prev.nseg if prev is not None else 0)

    def prefix(self, n: int) -> KVRef | None:
        """The ref of the first ``n`` positions (shares the segments; None for 0)."""
        if not 0 <= n <= self.depth:
            raise ValueError(f"a past of {n} positions asked of a ref holding {self.depth}")
        if n == 0:
            return None
        if n == self.depth:
            return self
        ref = self
        while ref.depth - ref.length >= n:
            ref = ref.prev
        return KVRef(ref.block, ref.row, ref.start, n - (ref.depth - ref.length), ref.prev)

    def blocks(self):
        ref = self
        while ref is not None:
            yield ref.block
            ref = ref.prev

    def segments(self, n: int) -> list[tuple[KVBlock, int, int, int]]:
        """``(block, row, start, length)`` pieces holding the first ``n`` positions, in order."""
        if not 0 <= n <= self.depth:
            raise ValueError(f"a past of {n} positions asked of a ref holding {self.depth}")
        out = []
        ref = self
        while ref is not None:
            base = ref.depth - ref.length
            if base < n:
                out.append((ref.block, ref.row, ref.start, min(ref.length, n - base)))
            ref = ref.prev
        out.reverse()
        return out


class Node:
    __slots__ = ("children", "depth", "kv", "logp", "parent", "pruned", "token")

    def __init__(self, parent, token: int, depth: int):
        self.parent = parent
        self.token = token
        self.depth = depth
        self.children: dict[int, Node] = {}
        self.logp: torch.Tensor | None = None
        self.kv: KVRef | None = None
        self.pruned = False  # taken out of the trie by eviction: never given a payload again


_LOGP, _KV = 0, 1  # the two payload slots of a node in the LRU order


class PrefixCache:
    """A trie of token prefixes with log-prob and KV payloads and LRU eviction.

    Args:
        budget_bytes: the most memory payloads may hold (log-prob vectors and KV blocks).
    """

    def __init__(self, budget_bytes: int):
        if not isinstance(budget_bytes, int) or budget_bytes < 0:
            raise ValueError(f"cache budget must be a non-negative int of bytes, got {budget_bytes!r}")
        self.budget_bytes = budget_bytes
        self.lock = threading.RLock()
        self.reserved = 0  # bytes of the budget kept free for memory outside the cache (see reserve)
        self.clear()

    def clear(self) -> None:
        with self.lock:
            self.root = Node(None, -1, 0)
            self._by_key: dict[tuple, Node] = {}  # nodes holding logp, by their full context
            # (node, _LOGP) / (node, _KV) for every payload held, least recently used first
            self._lru: OrderedDict[tuple[Node, int], None] = OrderedDict()
            self.nbytes = 0
            self.n_evicted = 0
            self.freed_bytes = 0  # payload bytes released by eviction (the backend trims the heap)

    # ------------------------------------------------------------------ lookups
    def get_logp(self, key: tuple, held: bool = False) -> torch.Tensor | None:
        """The cached log-probs after ``key`` (marked recently used), or None. ``held``: for a
        reader that keeps them: the row goes to the evicting end (the first payload dropped
        under pressure) and the node's past is marked recently used (a reader of a context
        usually extends it next)."""
        with self.lock:
            node = self._by_key.get(key)
            if node is None or node.logp is None:
                return None
            self._lru.move_to_end((node, _LOGP), last=not held)
            if held and node.kv is not None:
                self._lru.move_to_end((node, _KV))
            return node.logp

    def walk(self, ids, create: bool = False) -> list[Node]:
        """The nodes of ``ids`` from depth 1 on (stops early where the trie ends unless ``create``)."""
        with self.lock:
            node = self.root
            path = []
            for t in ids:
                nxt = node.children.get(t)
                if nxt is None:
                    if not create:
                        break
                    nxt = Node(node, t, node.depth + 1)
                    node.children[t] = nxt
                node = nxt
                path.append(node)
            return path

    def deepest_kv(self, ids, limit: int) -> tuple[int, KVRef | None]:
        """The longest prefix of ``ids`` of length <= ``limit`` whose past is cached: (length, ref)."""
        with self.lock:
            best = None
            held = []
            for node in self.walk(ids[:limit]):
                if node.kv is not None:
                    best = node
                    held.append(node)
            if best is None:
                return 0, None
            # The pasts of the prefixes on the way are prefixes of this one (its blocks, no
            # memory of their own): they stay as long as it does.
            for node in held:
                self._lru.move_to_end((node, _KV))
            return best.depth, best.kv

    # ------------------------------------------------------------------ inserts
    def put_logp(self, ids, logp: torch.Tensor, node: Node | None = None, held: bool = False) -> None:
        """Cache ``logp`` after ``ids`` (``node``: its trie node, if walked already). ``held``:
        it is handed to a reader who keeps it, so it goes to the evicting end (see get_logp)."""
        with self.lock:
            if node is None or node.pruned:  # a node an eviction took out since it was walked
                node = self.walk(ids, create=True)[-1]
            if node.logp is None:
                self.nbytes += logp.numel() * logp.element_size()
                self._by_key[tuple(ids)] = node
            else:
                self.nbytes -= node.logp.numel() * node.logp.element_size()
                self.nbytes += logp.numel() * logp.element_size()
            node.logp = logp
            self._lru[(node, _LOGP)] = None
            self._lru.move_to_end((node, _LOGP), last=not held)
            self._evict()

    def put_kv(self, nodes: list[Node], ref_of) -> None:
        """Point each of ``nodes`` without a past at ``ref_of(node)`` (a KVRef)."""
        with self.lock:
            for node in nodes:
                if node.kv is not None or node.pruned:
                    continue
                ref = ref_of(node)
                node.kv = ref
                for block in ref.blocks():
                    if block.refs == 0:
                        self.nbytes += block.nbytes
                    block.refs += 1
                self._lru[(node, _KV)] = None
                self._lru.move_to_end((node, _KV))
            self._evict()

    def repoint_kv(self, nodes: list[Node], ref_of) -> None:
        """Point ``nodes`` at new refs (e.g. one block holding a whole prefilled text)."""
        with self.lock:
            for node in nodes:
                if node.kv is not None:
                    self._drop_kv(node)
                    del self._lru[(node, _KV)]
            self.put_kv(nodes, ref_of)

    # ----------------------------------------------------------------- eviction
    def _drop_kv(self, node: Node) -> None:
        ref = node.kv
        node.kv = None
        for block in ref.blocks():
            block.refs -= 1
            if block.refs == 0:
                self.nbytes -= block.nbytes
                self.freed_bytes += block.nbytes

    def reserve(self, nbytes: int) -> None:
        """Keep ``nbytes`` of the budget free for memory held outside the cache (a pass's
        temporary tensors, the byte-level working set): payloads are evicted to make room.
        At most half the budget is reserved, so that a large pass does not flush the cache."""
        with self.lock:
            self.reserved = max(0, min(int(nbytes), self.budget_bytes // 2))
            self._evict()

    def _evict(self) -> None:
        while self.nbytes + self.reserved > self.budget_bytes and self._lru:
            (node, slot), _ = self._lru.popitem(last=False)
            if slot == _LOGP:
                self.nbytes -= node.logp.numel() * node.logp.element_size()
                self.freed_bytes += node.logp.numel() * node.logp.element_size()
                node.logp = None
                self._by_key.pop(self._key_of(node), None)
            else:
                self._drop_kv(node)
            self.n_evicted += 1
            self._prune_branch(node)

    def _key_of(self, node: Node) -> tuple:
        out = []
        while node.parent is not None:
            out.append(node.token)
            node = node.parent
        return tuple(reversed(out))

    def _prune_branch(self, node: Node) -> None:
        # Remove empty leaves so the trie does not grow without bound in long runs.
        while (node.parent is not None and not node.children and node.logp is None
               and node.kv is None):
            parent = node.parent
            if parent.children.get(node.token) is node:
                del parent.children[node.token]
            node.pruned = True
            node = parent


class CachedRowsLM:
    """What a backend whose rows live in ``self.cache`` (a :class:`PrefixCache`) and whose tokenizer
    is ``self.tokenizer`` answers the same way (``AsyncTransformer``, ``AsyncVLLM``): a peek that
    keeps the row for the reader to come, whether a row is cached, the tokenizer's encoding.
    A backend says by :meth:`_cache_readable` whether its cached rows may be served now."""

    def _cache_readable(self) -> bool:
        return True

    async def peek_next_token_logprobs(self, token_ids: list[int]):
        from genlm_bytes.lm.base import check_token_ids

        key = tuple(check_token_ids(token_ids, self.vocab_size))
        hit = self.cache.get_logp(key) if self._cache_readable() else None  # marked recently used
        if hit is not None:
            return hit
        row = await self.next_token_logprobs(token_ids)
        self.cache.get_logp(key)  # kept for the reader to come
        return row

    def has_logprobs(self, token_ids) -> bool:
        """Whether the distribution after ``token_ids`` is cached."""
        return self.cache.get_logp(tuple(token_ids)) is not None

    def encode_bytes(self, data: bytes) -> list[int] | None:
        from genlm_bytes.lm.vocab import encode_bytes

        return encode_bytes(self.tokenizer, self.byte_vocab, data)
