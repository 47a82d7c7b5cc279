"""Prefix cache of next-token log-probs and KV segments, under a memory budget.

Contexts are token-id sequences; they share prefixes, so the cache is a trie
of :class:`Node` (one per token position). A node may hold

- ``logp``: the next-token log-probs ``(V,)`` after its prefix, and/or
- ``kv``: a :class:`KVRef` into a :class:`KVBlock`, the keys/values a forward
  pass produced. ``block.keys[l][row, :, start:start + depth]`` is the past of
  this node's prefix for layer ``l`` (any prefix of a computed row is a valid
  past, so every node along the new tokens of a row points into the block).

Memory: every payload is charged to the budget (a block once, however many
nodes point into it). When the total goes over ``budget_bytes``, the least
recently used payloads are dropped; a block is freed when no node refers to it.
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
    """Keys and values of one forward pass: per layer ``(B, kv_heads, T, head_dim)``."""

    __slots__ = ("__weakref__", "keys", "nbytes", "refs", "values")

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]):
        self.keys = keys
        self.values = values
        self.nbytes = sum(k.numel() * k.element_size() for k in keys) * 2
        self.refs = 0


class KVRef:
    """Where a prefix's past lives: ``block``, its ``row``, and the slot of its first token."""

    __slots__ = ("block", "row", "start")

    def __init__(self, block: KVBlock, row: int, start: int):
        self.block = block
        self.row = row
        self.start = start

    def layer(self, i: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views ``(kv_heads, length, head_dim)`` of keys and values of layer ``i``."""
        s = self.start
        return (self.block.keys[i][self.row, :, s:s + length],
                self.block.values[i][self.row, :, s:s + length])


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
        self.clear()

    def clear(self) -> None:
        with self.lock:
            self.root = Node(None, -1, 0)
            self._by_key: dict[tuple, Node] = {}  # nodes holding logp, by their full context
            self._lru: OrderedDict[Node, None] = OrderedDict()  # nodes holding any payload
            self.nbytes = 0
            self.n_evicted = 0

    # ------------------------------------------------------------------ lookups
    def get_logp(self, key: tuple) -> torch.Tensor | None:
        with self.lock:
            node = self._by_key.get(key)
            if node is None or node.logp is None:
                return None
            self._lru.move_to_end(node)
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
            for node in self.walk(ids[:limit]):
                if node.kv is not None:
                    best = node
            if best is None:
                return 0, None
            if best in self._lru:
                self._lru.move_to_end(best)
            return best.depth, best.kv

    # ------------------------------------------------------------------ inserts
    def put_logp(self, ids, logp: torch.Tensor, node: Node | None = None) -> None:
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
            self._lru[node] = None
            self._lru.move_to_end(node)
            self._evict()

    def put_kv(self, nodes: list[Node], ref_of) -> None:
        """Point each of ``nodes`` without a past at ``ref_of(node)`` (a KVRef)."""
        with self.lock:
            for node in nodes:
                if node.kv is not None or node.pruned:
                    continue
                ref = ref_of(node)
                node.kv = ref
                if ref.block.refs == 0:
                    self.nbytes += ref.block.nbytes
                ref.block.refs += 1
                self._lru[node] = None
                self._lru.move_to_end(node)
            self._evict()

    def repoint_kv(self, nodes: list[Node], ref_of) -> None:
        """Point ``nodes`` at new refs (e.g. one block holding a whole prefilled text)."""
        with self.lock:
            for node in nodes:
                if node.kv is not None:
                    self._drop_kv(node)
            self.put_kv(nodes, ref_of)

    # ----------------------------------------------------------------- eviction
    def _drop_kv(self, node: Node) -> None:
        block = node.kv.block
        node.kv = None
        block.refs -= 1
        if block.refs == 0:
            self.nbytes -= block.nbytes

    def _evict(self) -> None:
        while self.nbytes > self.budget_bytes and self._lru:
            node, _ = self._lru.popitem(last=False)
            if node.logp is not None:
                self.nbytes -= node.logp.numel() * node.logp.element_size()
                node.logp = None
                self._by_key.pop(self._key_of(node), None)
            if node.kv is not None:
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
