"""TokenByteTrie: the trie of every token's bytes, and node masses from token distributions.

Tokens are sorted by their byte strings. Then the tokens below any trie node
form one contiguous range ``[lo, hi)`` of that order, and the tokens that end
exactly at the node come first in it (``[lo, end)``). So the mass of a node
(the probability of the tokens below it) is a range sum, and all node masses
at once are one sparse matrix product (node-token reachability × token
probabilities), which is what :meth:`TokenByteTrie.weight_sum` computes.

Example: for the vocabulary ``[b"a", b"ab", b"b"]`` the nodes are
root, ``a``, ``ab``, ``b``; the mass of ``a`` is p(a) + p(ab).

Not handled: tokens with an empty byte string. They spell nothing, so no byte
path reaches them; they get no node and their probability is in no node mass.
Duplicate byte strings (e.g. a SentencePiece byte-fallback token and the plain
token for the same byte) are kept as separate tokens ending at the same node.
"""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from genlm_bytes.batching import Batcher


def _check_device(device) -> torch.device:
    """The device the trie's tensors live on; a ValueError naming ``device`` when it is not usable here.

    >>> _check_device(None), _check_device("cpu")
    (device(type='cpu'), device(type='cpu'))
    """
    if device is None:
        return torch.device("cpu")
    if not isinstance(device, (str, torch.device)):  # a ValueError too: every bad device is one (issue 20)
        raise ValueError(  # noqa: TRY004
            f"device={device!r} ({type(device).__name__}) is not a device: pass a string such as 'cpu' or "
            f"'cuda:0', or a torch.device")
    try:
        dev = torch.device(device)
    except RuntimeError:  # torch's message lists every backend it knows; ours says what the trie runs on
        raise ValueError(f"device={device!r} is not a device name: use 'cpu', 'cuda' or 'cuda:<index>'") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ValueError(f"device={device!r}: the trie runs on 'cpu' or 'cuda' devices, not {dev.type!r}")
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        raise ValueError(f"device={device!r}: CUDA is not available on this machine; use device='cpu'")
    if dev.index is not None and dev.index >= n:
        raise ValueError(f"device={device!r}: this machine has {n} CUDA device(s), cuda:0 to cuda:{n - 1}")
    return dev


class TokenByteTrie:
    """The token-byte trie of a vocabulary.

    Args:
        vocab: ``vocab[t]`` is the byte string of token ``t``.
        eos_tokens: byte strings (or token ids) of end-of-sequence tokens: in
            :meth:`weight_sum` their mass goes to the extra ``eos_node`` instead of the byte nodes.
        device: where the sparse reachability matrix lives: ``"cpu"`` (default), ``"cuda"`` or
            ``"cuda:i"`` (a string or ``torch.device``); a device this machine lacks is a ValueError.

    Attributes:
        order: ``(n_sorted,)`` token ids in byte order (empty tokens left out).
        lo, hi, end: ``(n_nodes,)`` each node's token range in ``order``; ``[lo, end)`` end at the node.
        depth, parent, byte: ``(n_nodes,)`` node depth, parent id (-1 for the root), incoming byte.
        root: 0.
        eos_ids: sorted token ids counted as EOS.
        eos_node: index of the EOS slot in :meth:`weight_sum` outputs (``n_nodes``).
    """

    root = 0

    def __init__(self, vocab: Sequence[bytes], eos_tokens: Iterable = (), device=None):
        if isinstance(vocab, (str, bytes)) or not isinstance(vocab, Sequence):
            raise TypeError(f"vocab must be a list of byte strings, got {type(vocab).__name__}")
        for i, b in enumerate(vocab):
            if not isinstance(b, (bytes, bytearray)):
                raise TypeError(f"vocab[{i}] = {b!r} is not a byte string")
        self.vocab = [bytes(b) for b in vocab]
        self.V = len(self.vocab)
        self.eos_ids = self._eos_ids(eos_tokens)
        self.device = _check_device(device)
        self._build()
        self._M = None  # sparse reachability, built on first use

    def _eos_ids(self, eos_tokens) -> np.ndarray:
        if isinstance(eos_tokens, (str, bytes)):
            raise TypeError("eos_tokens must be a collection of byte strings (or token ids), not one string")
        wanted, ids = set(), set()
        for e in eos_tokens:
            if isinstance(e, (bytes, bytearray)):
                wanted.add(bytes(e))
            elif isinstance(e, (int, np.integer)) and not isinstance(e, bool):
                if not 0 <= e < self.V:
                    raise ValueError(f"eos token id {e} is out of range for {self.V} tokens")
                ids.add(int(e))
            else:
                raise TypeError(f"an EOS token must be a byte string or a token id, got {e!r}")
        found = {b for b in wanted if b in set(self.vocab)}
        missing = wanted - found
        if missing:
            raise ValueError(f"EOS token(s) {sorted(missing)!r} are not in the vocabulary")
        ids |= {t for t, b in enumerate(self.vocab) if b in wanted}
        return np.array(sorted(ids), dtype=np.int64)

    def _build(self) -> None:
        items = sorted((b, t) for t, b in enumerate(self.vocab) if b)
        self.order = np.array([t for _, t in items], dtype=np.int64)
        lo, hi, end, depth, parent, byte = [0], [len(items)], [0], [0], [-1], [-1]
        edges: dict[int, int] = {}
        stack = [0]  # stack[d]: node at depth d on the current path
        prev = b""
        for r, (s, _) in enumerate(items):
            m = min(len(prev), len(s))
            k = 0
            while k < m and prev[k] == s[k]:
                k += 1
            for node in stack[k + 1:]:
                hi[node] = r
            del stack[k + 1:]
            for d in range(k, len(s)):
                n = len(lo)
                lo.append(r)
                hi.append(-1)
                end.append(r)
                depth.append(d + 1)
                parent.append(stack[-1])
                byte.append(s[d])
                edges[(stack[-1] << 8) | s[d]] = n
                stack.append(n)
            end[stack[-1]] = r + 1  # this token ends here (duplicates extend the run)
            prev = s
        for node in stack[1:]:
            hi[node] = len(items)
        self.lo = np.array(lo, dtype=np.int64)
        self.hi = np.array(hi, dtype=np.int64)
        self.end = np.array(end, dtype=np.int64)
        self.depth = np.array(depth, dtype=np.int64)
        self.parent = np.array(parent, dtype=np.int64)
        self.byte = np.array(byte, dtype=np.int64)
        self.edges = edges
        self.n_nodes = len(lo)
        self.eos_node = self.n_nodes
        # Children of each node, by byte: kids[kid_start[n]:kid_start[n + 1]].
        kid_order = np.argsort(self.parent[1:], kind="stable") + 1
        self.kids = kid_order
        counts = np.bincount(self.parent[1:], minlength=self.n_nodes)
        self.kid_start = np.concatenate([[0], np.cumsum(counts)])
        # Position of each sorted token: which ids are EOS (masked in generation).
        self.eos_pos = np.nonzero(np.isin(self.order, self.eos_ids))[0]

    # ------------------------------------------------------------- navigation
    def child(self, node: int, b: int) -> int:
        """The child of ``node`` along byte ``b``, or -1."""
        return self.edges.get((node << 8) | b, -1)

    def walk(self, data: bytes, node: int = 0) -> int:
        """The node reached from ``node`` by ``data``, or -1."""
        for b in data:
            node = self.edges.get((node << 8) | b, -1)
            if node < 0:
                return -1
        return node

    def path(self, node: int) -> bytes:
        """The bytes from the root to ``node``."""
        out = []
        while node > 0:
            out.append(int(self.byte[node]))
            node = int(self.parent[node])
        return bytes(reversed(out))

    def end_tokens(self, node: int) -> np.ndarray:
        """Token ids whose bytes are exactly the path to ``node``."""
        return self.order[self.lo[node]:self.end[node]]

    def children(self, node: int) -> tuple[np.ndarray, np.ndarray]:
        """(bytes, node ids) of the children of ``node``, by byte."""
        kids = self.kids[self.kid_start[node]:self.kid_start[node + 1]]
        return self.byte[kids], kids

    # ------------------------------------------------------- sparse node masses
    def reachability(self) -> torch.Tensor:
        """Sparse CSR ``(n_nodes + 1, V)``: row n marks the non-EOS tokens below node n; the last row the EOS tokens."""
        if self._M is None:
            keep = np.ones(len(self.order), dtype=bool)
            keep[self.eos_pos] = False
            cols, crow = [], [0]
            for n in range(self.n_nodes):
                seg = self.order[self.lo[n]:self.hi[n]][keep[self.lo[n]:self.hi[n]]]
                cols.append(seg)
                crow.append(crow[-1] + len(seg))
            cols.append(self.eos_ids)
            crow.append(crow[-1] + len(self.eos_ids))
            col = torch.from_numpy(np.concatenate(cols).astype(np.int64))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
                self._M = torch.sparse_csr_tensor(torch.tensor(crow, dtype=torch.int64), col,
                                              torch.ones(len(col), dtype=torch.float64),
                                                  size=(self.n_nodes + 1, self.V)).to(self.device)
        return self._M

    def _as_probs(self, p) -> torch.Tensor:
        p = torch.as_tensor(p)
        if p.shape[-1] != self.V:
            raise ValueError(f"expected token probabilities with last dimension {self.V}, got {tuple(p.shape)}")
        return p.to(device=self.device, dtype=torch.float64)

    def weight_sum(self, p) -> torch.Tensor:
        """Node masses ``(n_nodes + 1,)`` from token probabilities ``p`` ``(V,)`` (probability space)."""
        return self.batch_weight_sum(self._as_probs(p)[None])[0]

    def batch_weight_sum(self, P) -> torch.Tensor:
        """Node masses ``(B, n_nodes + 1)`` from token probabilities ``(B, V)``: one sparse product."""
        P = self._as_probs(P)
        return (self.reachability() @ P.T).T

    def weight_max(self, p) -> torch.Tensor:
        """Largest token probability below each node ``(n_nodes + 1,)`` (0 where none)."""
        return self.batch_weight_max(self._as_probs(p)[None])[0]

    def batch_weight_max(self, P) -> torch.Tensor:
        """Batched :meth:`weight_max`: ``(B, V) -> (B, n_nodes + 1)``, a segment max over the CSR rows."""
        P = self._as_probs(P)
        M = self.reachability()
        crow, col = M.crow_indices(), M.col_indices()
        lengths = crow[1:] - crow[:-1]
        vals = P[:, col]  # (B, nnz)
        out = torch.segment_reduce(vals, "max", lengths=lengths.expand(P.shape[0], -1), axis=1,
                                   unsafe=True)
        return torch.where(lengths > 0, out, torch.zeros((), dtype=out.dtype, device=out.device))


class AsyncTokenByteTrie:
    """A :class:`TokenByteTrie` whose ``weight_sum`` / ``weight_max`` calls from concurrent
    coroutines are batched into one sparse product each."""

    def __init__(self, trie: TokenByteTrie, max_batch_size: int = 64):
        if not isinstance(trie, TokenByteTrie):
            raise TypeError(f"trie must be a TokenByteTrie (or use AsyncTokenByteTrie.from_vocab(vocab, "
                            f"device=...)), got {type(trie).__name__}")
        self.trie = trie
        self._sum = Batcher(lambda ps: list(trie.batch_weight_sum(torch.stack(ps))), max_batch_size,
                            name="trie-sum")
        self._max = Batcher(lambda ps: list(trie.batch_weight_max(torch.stack(ps))), max_batch_size,
                            name="trie-max")

    @classmethod
    def from_vocab(cls, vocab, **kwargs) -> AsyncTokenByteTrie:
        """A batched trie of ``vocab``: keywords of :class:`TokenByteTrie` (``eos_tokens``, ``device``)
        and ``max_batch_size``."""
        return cls(TokenByteTrie(vocab, **{k: v for k, v in kwargs.items() if k != "max_batch_size"}),
                   **{k: v for k, v in kwargs.items() if k == "max_batch_size"})

    async def weight_sum(self, p) -> torch.Tensor:
        p = self.trie._as_probs(p)
        return await self._sum.submit(object(), p)

    async def weight_max(self, p) -> torch.Tensor:
        p = self.trie._as_probs(p)
        return await self._max.submit(object(), p)

    async def batch_weight_sum(self, P) -> torch.Tensor:
        return torch.stack(await asyncio.gather(*(self.weight_sum(p) for p in P)))
