"""One pass through the model: build its inputs, run it, store what it computed.

Two kinds of pass, each three steps:

- :meth:`PassRunner.forward`, a *ragged* pass: rows of different past and new lengths in one
  batch; pasts left-padded to the longest, new tokens right-padded, a 2-D attention mask and
  each row's own ``position_ids`` keep every row exact (:func:`ragged_inputs`).
- :meth:`PassRunner.tree_pass`, a *tree-masked* pass on one cached past: a path of new tokens
  and alternative chains branching off it, each attending to its own prefix only
  (:func:`tree_layout`, a 4-D mask); what scoring and prefill need.

Either runs through the forward :class:`~genlm_bytes.lm.hf.faithful.ModelWatch` allows
(lean, transformers' decoder, or the model's own forward), on a
:func:`~genlm_bytes.lm.hf.pass_cache.make_pass_cache` cache, then hands the keys/values to the
:class:`~genlm_bytes.lm.hf.kv.KVStore` and caches the log-prob row after every new prefix.

Not handled: encoder-decoder models; the model's own forward (hooks) computes logits of every
kept position at once (more memory than the chunked output layer of the other two).
"""

from __future__ import annotations

import collections
import itertools
import logging

import torch
import torch.nn.functional as F

from genlm_bytes.lm.gemm import ROW_BUCKETS, linear_fn
from genlm_bytes.lm.hf.attention import grouped_attention
from genlm_bytes.lm.hf.memory import MMAP_THRESHOLD_BYTES
from genlm_bytes.lm.hf.pass_cache import make_pass_cache
from genlm_bytes.lm.lean import decoder_of

logger = logging.getLogger(__name__)


def ragged_inputs(rows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """Inputs of a ragged pass over ``rows`` ``(ids, ref, past length)``: token ids ``(B, Kn)``,
    the 2-D attention mask ``(B, P + Kn)`` (1 on real slots: pasts left-padded to the longest
    ``P``, new tokens right-padded to the longest ``Kn``), ``position_ids`` ``(B, Kn)``, and each
    row's number of new tokens."""
    B = len(rows)
    P = max(p for _, _, p in rows)
    ks = [len(ids) - p for ids, _, p in rows]
    Kn = max(ks)
    input_ids = torch.zeros((B, Kn), dtype=torch.long)
    attn = torch.zeros((B, P + Kn), dtype=torch.long)
    pos = torch.zeros((B, Kn), dtype=torch.long)
    for b, (ids, _, p) in enumerate(rows):
        input_ids[b, : ks[b]] = torch.tensor(ids[p:])
        attn[b, P - p: P + ks[b]] = 1
        pos[b] = p + torch.arange(Kn)
    return input_ids, attn, pos, ks


def attention_buckets(pasts: list[int], n: int, cost: int, most_cuts: int = 48) -> list[tuple[int, int, int]]:
    """Rows with pasts ``pasts`` (longest first) and ``n`` new slots each, split into contiguous
    buckets ``(r0, r1, Pb)`` (``Pb = pasts[r0]``, the longest of the bucket) that minimize the
    key slots a pass gathers and attends to, ``sum((r1 - r0) * (Pb + n))``, plus ``cost`` slots
    per bucket (a bucket's own calls). Cuts are searched among ``most_cuts`` places at most.
    Bad input (no rows, pasts not ints >= 0 in non-increasing order, ``n`` < 1, ``cost`` < 0,
    ``most_cuts`` < 1) is a ValueError."""
    pasts = list(pasts)
    ints = (n, cost, most_cuts, *pasts)
    if any(isinstance(v, bool) or not isinstance(v, int) for v in ints):
        raise ValueError(f"pasts, n, cost and most_cuts must be ints, got {pasts!r}, {n!r}, {cost!r}, {most_cuts!r}")
    if not pasts or min(pasts) < 0 or any(a < b for a, b in itertools.pairwise(pasts)):
        raise ValueError(f"pasts must be one or more lengths >= 0, longest first, got {pasts!r}")
    if n < 1 or cost < 0 or most_cuts < 1:
        raise ValueError(f"need n >= 1, cost >= 0 and most_cuts >= 1, got n={n}, cost={cost}, most_cuts={most_cuts}")
    B = len(pasts)
    step = -(-B // most_cuts)
    cuts = list(range(0, B, step)) + [B]
    best, back = {0: 0}, {}
    for j in cuts[1:]:
        best[j], back[j] = min((best[i] + cost + (j - i) * (pasts[i] + n), i) for i in cuts if i < j)
    out, j = [], B
    while j:
        i = back[j]
        out.append((i, j, pasts[i]))
        j = i
    return out[::-1]


def tree_layout(ids: tuple, P: int, tail: int, items) -> tuple[list, list[int], torch.Tensor, torch.Tensor]:
    """The slots of a tree pass on the past ``ids[:P]``: the path ``ids[P:P + tail]``, then per
    item ``(i, chain, subs)`` the chain at positions ``i, i + 1, ...`` and each sub-branch
    ``(k, t)`` after ``chain[:k]``. Returns the slots ``(first position, tokens, first slot,
    parent slot entry or -1, k)``, the tokens in slot order, their positions ``(Q,)``, and which
    key each query may attend to ``(Q, P + Q)`` (bool): a slot sees the past before where its
    chain leaves the path, the path tokens of this pass before that, its parent chain's first
    ``k`` slots, and its own chain up to itself."""
    n_path = P + tail
    slots = [(P, ids[P:n_path], 0, -1, 0)]
    q = tail
    for i, chain, subs in items:
        if i > n_path:
            raise ValueError(f"alternative at {i} is past the computed path ({n_path} tokens)")
        m = len(slots)
        slots.append((i, chain, q, -1, 0))
        q += len(chain)
        for k, t in subs:
            slots.append((i + k, (t,), q, m, k))
            q += 1
    Q = q
    own_start, past_lim = torch.empty(Q, dtype=torch.long), torch.empty(Q, dtype=torch.long)
    path_lim, par_lo, par_hi = (torch.zeros(Q, dtype=torch.long) for _ in range(3))
    pos = torch.empty(Q, dtype=torch.long)
    tokens = []
    for e, (i, chain, s, parent, k) in enumerate(slots):
        L = len(chain)
        root = i if parent < 0 else slots[parent][0]  # where the chain leaves the path
        own_start[s:s + L] = s
        past_lim[s:s + L] = min(root, P)
        if e:  # not the path: the path tokens of this pass before the branch point
            path_lim[s:s + L] = max(0, root - P)
        if parent >= 0:
            ps = slots[parent][2]
            par_lo[s:s + L], par_hi[s:s + L] = ps, ps + k
        pos[s:s + L] = i + torch.arange(L)
        tokens.extend(chain)
    qi, cols = torch.arange(Q)[:, None], torch.arange(Q)[None, :]
    new_ok = (((cols >= own_start[:, None]) & (cols <= qi)) | (cols < path_lim[:, None])
              | ((cols >= par_lo[:, None]) & (cols < par_hi[:, None])))  # (Q, Q)
    past_ok = torch.arange(P)[None, :] < past_lim[:, None]  # (Q, P)
    return slots, tokens, pos, torch.cat([past_ok, new_ok], dim=1)


def many_layout(jobs) -> tuple:
    """The one row :meth:`PassRunner.tree_many` runs for tree passes ``(ids, P, ref, tail,
    items)`` on different pasts: their pasts laid end to end, then their slots, each job's
    slots seeing only its own past and its own tree (at the job's own positions). Returns the
    jobs' :func:`tree_layout` s, the tokens, the slots' positions ``(Q,)``, the keys' positions
    ``(Pt + Q,)``, which key each slot may attend to ``(Q, Pt + Q)``, the pasts' segments in
    order, and each job's slot spans (its path's, then its alternatives', the empty ones left out)."""
    layouts = [tree_layout(ids, P, tail, items) for ids, P, _, tail, items in jobs]
    Pt, Q = sum(job[1] for job in jobs), sum(len(lay[1]) for lay in layouts)
    allowed = torch.zeros((Q, Pt + Q), dtype=torch.bool)
    tokens, pos, key_pos, pasts, spans = [], [], [], [], []
    p0 = q0 = 0
    for (ids, P, ref, tail, _), (_, toks, ps, ok) in zip(jobs, layouts):
        q = len(toks)
        allowed[q0:q0 + q, p0:p0 + P] = ok[:, :P]
        allowed[q0:q0 + q, Pt + q0:Pt + q0 + q] = ok[:, P:]
        tokens.extend(toks)
        pos.append(ps)
        key_pos.append(torch.arange(P))
        if P:
            pasts.extend(ref.segments(P))
        spans += [(q0, q0 + tail)] * bool(tail) + [(q0 + tail, q0 + q)] * (q > tail)
        p0, q0 = p0 + P, q0 + q
    pos = torch.cat(pos) if pos else torch.zeros(0, dtype=torch.long)
    return layouts, tokens, pos, torch.cat(key_pos + [pos]), allowed, pasts, spans


class OutputLayer:
    """A pass's output layer: logits of its kept positions, and their log-prob rows.

    Where :meth:`buffered` allows, a chunk's logits are log-softmaxed in place, and never in a
    tensor glibc maps fresh: a large vocabulary's chunk (64 rows: 67 MB at 262k tokens) was
    mapped twice per chunk, and faulting its pages in took 0.6 s of a 9.8 s Gemma 3 prefill
    (benchmarks/README.md, session 15). With oneDNN's products (``EngineConfig.onednn``,
    :mod:`genlm_bytes.lm.gemm`) a chunk is as many rows as stay below glibc's mmap threshold
    (the heap reuses their pages); with ``F.linear``'s, the logits go into one buffer this
    layer keeps. The rows are the same either way.

    Args:
        model: the transformers causal LM.
        store: the :class:`~genlm_bytes.lm.hf.kv.KVStore` (it reserves the buffer's bytes).
        watch: the :class:`~genlm_bytes.lm.hf.faithful.ModelWatch` (the buffer only for lean passes).
        config: the :class:`~genlm_bytes.lm.hf.config.EngineConfig`.
        onednn: its products through oneDNN (:mod:`genlm_bytes.lm.gemm`) where they apply.
        packed: ... by the weight's packed copy where there is one (``EngineConfig.packed_weights``).
    """

    def __init__(self, model, store, watch, config, onednn: bool = False, packed: bool = False):
        self.model, self.store, self.watch, self.config = model, store, watch, config
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        self.buffer = None  # (rows, V) float32, grown to the most rows asked for (F.linear's products)
        self.linear = linear_fn(onednn, packed)
        self.onednn = self.linear is not F.linear
        # Rows per chunk of a buffered pass: with oneDNN, the largest row bucket (the rows its
        # product runs with) whose logits stay below the mmap threshold.
        row_bytes = 4 * model.get_output_embeddings().weight.shape[0]
        fit = min(config.logp_chunk, (MMAP_THRESHOLD_BYTES - (1 << 20)) // row_bytes)
        self.chunk = max(b for b in ROW_BUCKETS if b <= max(1, fit)) if self.onednn else config.logp_chunk
        store.logits_chunk = self.chunk

    def logits(self, hidden: torch.Tensor, into_buffer: bool = False) -> torch.Tensor:
        """Logits ``(N, V)`` of ``hidden`` ``(N, H)``; ``into_buffer``: for :meth:`rows` to
        log-softmax in place (oneDNN's fresh chunk, or written into the buffer)."""
        layer = self.model.get_output_embeddings()
        if into_buffer and self.onednn:  # (a fresh chunk below the mmap threshold: see the class)
            return self.linear(hidden, layer.weight, layer.bias)
        n, pad = hidden.shape[0], self.config.head_pad
        if hidden.dim() == 2 and 5 <= n < pad and hidden.device.type == "cpu":  # (see EngineConfig.head_pad)
            hidden = torch.cat([hidden, hidden.new_zeros(pad - n, hidden.shape[1])])
        if into_buffer:  # (the product F.linear runs, into the buffer)
            w, b = layer.weight, layer.bias
            out = self._buffer(hidden.shape[0], w)
            return (torch.mm(hidden, w.t(), out=out) if b is None else torch.addmm(b, hidden, w.t(), out=out))[:n]
        logits = layer(hidden)[:n]  # (N, V)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def buffered(self, head, states: torch.Tensor) -> bool:
        """Whether :meth:`rows` may log-softmax the logits of ``head`` in place (see the class): this layer's
        (not the model's own forward's) in a lean pass (the model is pristine: its output layer
        a plain ``Linear`` without hooks) of a float32 model on the CPU, without soft-capping,
        outside autograd."""
        layer = self.model.get_output_embeddings()
        return (head == self.logits and self.watch.mode == "lean" and not self.softcap and not torch.is_grad_enabled()
                and type(layer) is torch.nn.Linear and layer.weight.dtype == torch.float32 == states.dtype
                and layer.weight.device.type == "cpu")

    def _buffer(self, rows: int, w: torch.Tensor) -> torch.Tensor:
        """``rows`` rows of the buffer, grown to the most rows asked for (every pass reserves its
        bytes: ``KVStore.pass_bytes``)."""
        buf = self.buffer
        if buf is None or buf.shape[0] < rows or buf.shape[1] != w.shape[0]:
            self.buffer = None  # (the old one freed first)
            buf = self.buffer = w.new_empty((max(rows, 0 if buf is None else buf.shape[0]), w.shape[0]))
            self.store.logits_reserved = buf.numel() * buf.element_size()
        return buf[:rows]

    def rows(self, states: torch.Tensor, head):
        """The (V,) log-prob rows of ``states`` (N, ·) by ``head`` (:meth:`logits`, or the identity
        for logits already computed), a chunk at a time (``self.chunk`` rows where
        :meth:`buffered`, else ``logp_chunk``), each its own copy (a view would keep the whole
        chunk alive in the cache)."""
        buffered = self.store.logits_buffered = self.buffered(head, states)
        chunk = self.chunk if buffered else self.config.logp_chunk
        for c in range(0, states.shape[0], chunk):
            if buffered:
                lp = self.logits(states[c:c + chunk], into_buffer=True)
                torch.log_softmax(lp, dim=-1, out=lp)
            else:
                lp = torch.log_softmax(head(states[c:c + chunk]).float(), dim=-1)
            for row in lp:
                yield row.clone()
            del lp


class PassRunner:
    """Runs passes of ``model`` and stores their results (the engine's model runner).

    Args:
        model: the transformers causal LM.
        store: the :class:`~genlm_bytes.lm.hf.kv.KVStore` (its ``cache`` takes the log-probs).
        watch: the :class:`~genlm_bytes.lm.hf.faithful.ModelWatch` (which forward to run).
        trimmer: the :class:`~genlm_bytes.lm.hf.memory.HeapTrimmer` (run around each pass).
        config: the :class:`~genlm_bytes.lm.hf.config.EngineConfig`.
        onednn: the output layer's products through oneDNN (the backend decides: see
            ``AsyncTransformer.onednn``).
        packed: ... by its packed copy of the weight (``AsyncTransformer.packed``).
    """

    def __init__(self, model, store, watch, trimmer, config, onednn: bool = False, packed: bool = False):
        self.model, self.store, self.cache, self.watch = model, store, store.cache, watch
        self.trimmer, self.config = trimmer, config
        self.device = next(model.parameters()).device
        self.sliding_window = getattr(model.config, "sliding_window", None)  # (some layers attend that far back)
        self.n_forward_tokens = 0  # tokens run through the model: for tests and benchmarks
        self.passes = collections.Counter()  # passes run per forward kind ("lean", "decoder", "model")
        self._keeps_logits = True  # the model's forward takes logits_to_keep
        self.before_layer = None  # run once per layer of a pass (may raise to stop it; see speculation)
        self.out = OutputLayer(model, store, watch, config, onednn, packed)

    # ------------------------------------------------------------------ running
    def make_cache(self, rows, P: int, keep=(), arena=None, buckets=None, pasts=None):
        """The cache a pass on the pasts of ``rows`` (left-padded to ``P``) runs with (see
        :func:`~genlm_bytes.lm.hf.pass_cache.make_pass_cache`); ``keep``: ``(row, lo, hi)`` slots
        of rows stored whole; ``arena``: see :meth:`KVStore.arena_for`; ``buckets``: see
        :meth:`buckets`; ``pasts``: per row ``(segments, length)`` given instead of ``rows``."""
        if not self.store.kv_reuse:
            from transformers import DynamicCache

            return DynamicCache(config=self.model.config)
        if pasts is None:
            pasts = [(ref.segments(p) if p else [], p) for _, ref, p in rows]  # (block, row, start, n) pieces
        lean = self.watch.lean if self.watch.mode == "lean" else None
        return make_pass_cache(self.model, len(lean.layers) if lean is not None else None, pasts, P, keep, arena,
                               self.before_layer, self.config.gather_chunk_bytes, buckets)

    def buckets(self, rows) -> tuple[list[int] | None, list | None]:
        """How a ragged pass on ``rows`` splits its attention: ``(order, buckets)``, the rows sorted
        by past length (longest first) and the :func:`attention_buckets` of that order, each
        padded to its own longest past; ``(None, None)`` where one bucket is best, or where the
        pass does not run the lean decoder (whose attention runs per bucket, see
        ``LeanCache``) or keeps no pasts. Rows of 32 pasts between ~5 and ~55 tokens gather
        and attend to about half the slots in two or three buckets."""
        cost = self.config.bucket_slots
        if (len(rows) < 2 or not cost or not self.store.kv_reuse or self.watch.mode != "lean"
                or not getattr(self.watch.lean, "bucketed", False)):
            return None, None
        order = sorted(range(len(rows)), key=lambda b: -rows[b][2])
        n = max(len(ids) - p for ids, _, p in rows)
        buckets = attention_buckets([rows[b][2] for b in order], n, cost)
        return (order, buckets) if len(buckets) > 1 else (None, None)

    def _run(self, input_ids, attention_mask, position_ids, cache, n_keep: int, key_positions=None):
        """Run one pass: ``(states (B, T, ·), head)`` where ``head(states[...])`` gives logits.
        The lean and decoder paths return hidden states (the output layer runs in chunks
        later); the model's own forward returns the logits of the last ``n_keep`` positions,
        padded in front to ``T`` positions of which only those are read. ``key_positions``
        ``(B, L)``: the keys' positions under a 4-D mask, for layers with a sliding window (see
        :mod:`~genlm_bytes.lm.hf.attention`)."""
        mode = self.watch.mode
        self.passes[mode] += 1
        dev = self.device
        args = (input_ids.to(dev), None if attention_mask is None else attention_mask.to(dev), position_ids.to(dev))
        if mode == "lean":
            kp = None if key_positions is None else key_positions.to(dev)
            return self.watch.lean(*args, cache, key_positions=kp), self.out.logits
        windows = None
        if key_positions is not None and self.sliding_window is not None:
            windows = (args[2], key_positions.to(dev))
        with grouped_attention(self.model, windows):
            if mode == "decoder":
                hidden = decoder_of(self.model)(input_ids=args[0], attention_mask=args[1], position_ids=args[2],
                                                past_key_values=cache, use_cache=True).last_hidden_state
                return hidden, self.out.logits
            logits = self._model_logits(args, cache, n_keep)
        T = input_ids.shape[1]
        if logits.shape[1] < T:  # (front positions not kept: never read)
            logits = torch.nn.functional.pad(logits, (0, 0, T - logits.shape[1], 0))
        return logits, lambda x: x

    def _model_logits(self, args, cache, n_keep: int) -> torch.Tensor:
        """The model's own forward: logits ``(B, n_keep, V)`` of the last ``n_keep`` positions (all
        of them for a model whose forward takes no ``logits_to_keep``)."""
        kwargs = {"input_ids": args[0], "attention_mask": args[1], "position_ids": args[2],
                  "past_key_values": cache, "use_cache": True}
        if self._keeps_logits:
            try:
                return self.model(**kwargs, logits_to_keep=n_keep).logits
            except TypeError as e:  # (a user's forward with a fixed signature)
                if "logits_to_keep" not in str(e):
                    raise
                self._keeps_logits = False
        return self.model(**kwargs).logits

    # ------------------------------------------------------------------ a ragged pass
    @torch.inference_mode()
    def forward(self, rows, all_positions: bool, grow: bool = False, short_chains: bool = False):
        """One ragged pass. ``rows``: (ids, past ref or None, past length).

        Returns per row the (V,) log-probs after the whole context (nothing with
        ``all_positions``: then the log-probs after each new token are only cached).
        Caches log-probs and KV of every new prefix. One row extending an arena's tip
        writes into it; ``grow``: one row starts a new arena (see KVStore.arena_for).
        ``short_chains``: generation requests (see KVStore.chain_full).
        """
        store = self.store
        order, buckets = self.buckets(rows)
        if order is not None:  # (rows by past length, longest first: the results go back in order)
            rows = [rows[b] for b in order]
        input_ids, attn, pos, ks = ragged_inputs(rows)
        B, Kn = input_ids.shape
        P = attn.shape[1] - Kn
        pads = [Pb for r0, r1, Pb in buckets for _ in range(r0, r1)] if buckets else [P] * B
        arena = store.arena_for(rows[0][1], P, Kn, grow) if B == 1 else None
        keep = [] if arena else [(b, pads[b] - p, pads[b] + ks[b]) for b, (_, ref, p) in enumerate(rows)
                                 if store.chain_full(ref, short_chains)]
        store.reserve_pass(B, P + Kn, Kn, sum(ks) if all_positions else B, keep, arena)
        self.trimmer.pass_started()
        cache = self.make_cache(rows, P, keep, arena, buckets)
        # One row has no padding: the plain causal mask (none for one new token) is exact.
        states, head = self._run(input_ids, attn if B > 1 else None, pos, cache,
                                 Kn if all_positions else Kn - min(ks) + 1)  # (B, Kn, ·)
        self.n_forward_tokens += sum(ks)
        if all_positions:
            sel = [states[b, : ks[b]] for b in range(B)]  # each (k_b, ·)
        else:
            sel = [states[b, ks[b] - 1: ks[b]] for b in range(B)]  # each (1, ·)
        block = self._store_ragged(rows, cache.layers, arena, P + Kn, all_positions,
                                   self.out.rows(torch.cat(sel), head), out := [])
        store.end_pass(block, B * Kn)
        self.trimmer.pass_ended()
        if order is not None and out:
            back = [None] * B
            for b, row in zip(order, out):
                back[b] = row
            out = back
        return out

    def _store_ragged(self, rows, layers, arena, filled: int, all_positions: bool, logp_rows, out: list):
        """Store a ragged pass: every new prefix points into its keys/values; log-probs cached
        where computed (appended to ``out`` too unless ``all_positions``). Returns the pass's
        block (None when it wrote an arena or keeps no KV)."""
        store, cache = self.store, self.cache
        block = arena_block = None
        if arena:
            arena_block = store.arena_block(layers, arena, filled)
        elif store.kv_reuse:
            block = store.new_block(layers)
        for b, (ids, ref, p) in enumerate(rows):
            path = cache.walk(ids, create=True)
            new_nodes = path[p:]
            if arena_block is not None:
                store.point_at_arena(path if arena[0] is None else new_nodes, arena_block, arena[0] is None)
            elif block is not None:
                store.put_segment(new_nodes, block, b, 0, p, ref if p else None, layers)
            if all_positions:
                for j, node in enumerate(new_nodes):
                    cache.put_logp(ids[: p + j + 1], next(logp_rows), node=node)
            else:
                row = next(logp_rows)
                cache.put_logp(ids, row, node=path[-1], held=True)  # the requester keeps it
                out.append(row)
        return block

    # ------------------------------------------------------------------ a tree pass
    @torch.inference_mode()
    def tree_pass(self, ids: tuple, P: int, ref, tail: int, items: list[tuple[int, tuple, tuple]],
                  grow: bool = False) -> None:
        """One tree-masked pass on the cached past ``ids[:P]`` (see :func:`tree_layout`): the path
        tokens ``ids[P:P + tail]`` and the items' chains. Caches log-probs and KV of every new
        prefix. The path goes into an arena as in :meth:`forward` (the alternatives' slots
        after it are copied out)."""
        store = self.store
        slots, tokens, pos, allowed = tree_layout(ids, P, tail, items)
        Q = len(tokens)
        if Q == 0:
            return
        mask = self._additive(allowed[None, None])
        arena = store.arena_for(ref, P, Q, grow)
        keep = [(0, 0, P + tail)] if store.chain_full(ref) and not arena else []
        store.reserve_pass(1, P + Q, Q, Q, keep, arena)
        self.trimmer.pass_started()
        cache = self.make_cache([(ids[:P], ref, P)], P, keep, arena)
        states, head = self._run(torch.tensor([tokens]), mask, pos[None], cache, Q,
                                 torch.cat([torch.arange(P), pos])[None])
        self.n_forward_tokens += Q
        logp_rows = self.out.rows(states[0], head)  # Q rows, in slot order
        del states
        layers = cache.layers
        path_block, alt_block = store.split_block(layers, tail, bool(arena))
        if arena:
            path_block = store.arena_block(layers, arena, P + tail)
        store.store_tree(ids, P, ref, tail, slots, layers, arena, path_block, alt_block, logp_rows)
        if arena:
            store.end_pass(alt_block, Q - tail)
        else:
            store.end_pass(path_block or alt_block, tail if path_block is not None else Q)
        self.trimmer.pass_ended()
        logger.debug("tree pass: %d path tokens and %d alternatives on a past of %d", tail, len(items), P)

    @torch.inference_mode()
    def tree_many(self, jobs: list[tuple[tuple, int, object, int, list]]) -> None:
        """Several tree passes ``(ids, P, ref, tail, items)`` (each as :meth:`tree_pass` takes
        it) run as one pass of one row (:func:`many_layout`): no padding, whatever the jobs'
        sizes, where a pass of their own each reads all the weights again. Caches what each
        job's own tree pass would: the log-probs and KV of every new prefix, each job's path
        and alternatives in blocks of their own. Pasts are never stored whole here (a job whose
        chain is full runs alone: see KVStore.chain_full)."""
        store = self.store
        layouts, tokens, pos, key_pos, allowed, pasts, spans = many_layout(jobs)
        Q = len(tokens)
        if Q == 0:
            return
        Pt = key_pos.shape[0] - Q
        store.reserve_pass(1, Pt + Q, Q, Q)
        self.trimmer.pass_started()
        cache = self.make_cache((), Pt, pasts=[(pasts, Pt)])
        states, head = self._run(torch.tensor([tokens]), self._additive(allowed[None, None]), pos[None], cache, Q,
                                 key_pos[None])
        self.n_forward_tokens += Q
        logp_rows = self.out.rows(states[0], head)  # Q rows, in slot order (job by job)
        del states
        layers = cache.layers
        blocks = store.split_spans(layers, spans)  # (the path's and the alternatives' of each job)
        it = iter(blocks)
        for (ids, P, ref, tail, _), (slots, toks, *_) in zip(jobs, layouts):
            path_block = next(it) if tail else None
            alt_block = next(it) if len(toks) > tail else None
            store.store_tree(ids, P, ref, tail, slots, layers, None, path_block, alt_block, logp_rows)
        store.end_pass(blocks[0], spans[0][1] - spans[0][0])
        self.trimmer.pass_ended()
        logger.debug("tree pass of %d jobs: %d slots on pasts of %d tokens in all", len(jobs), Q, Pt)

    def _additive(self, allowed: torch.Tensor) -> torch.Tensor:
        """A bool mask (True: attend) as the additive float mask of the model's dtype."""
        dtype = next(self.model.parameters()).dtype
        return torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, float("-inf"))

    @torch.inference_mode()
    def tree_rows(self, rows, hand_out: int | None = None) -> list:
        """A ragged tree pass: rows ``(ids, past ref, past length p, items)`` on different pasts,
        each the path ``ids[p:]`` with the items' chains branching off it as in :meth:`tree_pass`,
        in one batch (pasts left-padded to the longest as in :meth:`forward`, slots right-padded).
        What a few generation requests with their likely next contexts need (see the Scheduler).
        Caches log-probs and KV of every new prefix; returns for each of the first ``hand_out``
        rows (default: all) the log-prob row after its ``ids``, held for the requester (None
        where a tiny budget evicted it at once); the other rows' stay cached for later reads."""
        store = self.store
        layouts = [tree_layout(ids, p, len(ids) - p, items) for ids, _, p, items in rows]
        B, P = len(rows), max(r[2] for r in rows)
        Qs = [len(lay[1]) for lay in layouts]
        Q = max(Qs)
        input_ids, pos = torch.zeros((B, Q), dtype=torch.long), torch.zeros((B, Q), dtype=torch.long)
        allowed = torch.zeros((B, Q, P + Q), dtype=torch.bool)
        for b, ((_, _, p, _), (_, tokens, ps, ok)) in enumerate(zip(rows, layouts)):
            q = Qs[b]
            input_ids[b, :q], pos[b, :q], pos[b, q:] = torch.tensor(tokens), ps, p
            allowed[b, :q, P - p:P], allowed[b, :q, P:P + q] = ok[:, :p], ok[:, p:]
            allowed[b, range(q, Q), range(P + q, P + Q)] = True  # (a padding slot sees itself: no NaN)
        mask = self._additive(allowed[:, None])
        keep = [(b, P - p, P + len(ids) - p) for b, (ids, ref, p, _) in enumerate(rows)
                if store.chain_full(ref, True)]
        store.reserve_pass(B, P + Q, Q, sum(Qs), keep)
        self.trimmer.pass_started()
        cache = self.make_cache([r[:3] for r in rows], P, keep)
        key_pos = torch.cat([torch.arange(P)[None] - (P - torch.tensor([r[2] for r in rows]))[:, None], pos], dim=1)
        states, head = self._run(input_ids, mask, pos, cache, Q, key_pos)  # (padding keys: masked anyway)
        self.n_forward_tokens += sum(Qs)
        logp_rows = self.out.rows(torch.cat([states[b, :Qs[b]] for b in range(B)]), head)
        del states
        layers = cache.layers
        block = store.new_block(layers) if store.kv_reuse else None
        for b, ((ids, ref, p, _), (slots, *_)) in enumerate(zip(rows, layouts)):
            store.store_tree(ids, p, ref, len(ids) - p, slots, layers, None, block, None, logp_rows, row=b)
        store.end_pass(block, B * Q)
        self.trimmer.pass_ended()
        return [self.cache.get_logp(r[0], held=True) for r in rows[:hand_out]]
