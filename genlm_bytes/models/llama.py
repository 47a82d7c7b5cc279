"""LlamaTransformer: a LLaMA-style decoder in plain torch, with an immutable KV cache.

Blocks are RMSNorm → self-attention (RoPE, grouped-query) → residual, then
RMSNorm → SwiGLU feed-forward → residual; a final RMSNorm and the output layer
give logits (optionally soft-capped to ±``logits_soft_cap``).

Three ways to call it:

- ``model(input_ids)``: logits ``(B, S, V)`` of a full sequence;
- ``model.forward_cached(input_ids, cache)``: logits of the new tokens and a new
  :class:`KVCache` (the old one is untouched, so a cache can be forked for free);
- ``model.forward_ragged(token_lists, caches)``: one padded forward for rows with
  pasts and extensions of different lengths (what a batching backend needs).

RoPE uses the "rotate half" layout of Hugging Face checkpoints, so
:meth:`LlamaTransformer.from_hf` copies weights without permuting them.

Not handled: RoPE scaling variants (llama3, yarn, linear), sliding-window
attention, biases on only some projections (Qwen2), quantized weights.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from genlm_bytes.models.layers import (
    apply_rope,
    attend,
    group_mask,
    inv_frequencies,
    merge_heads,
    rope_tables,
    split_heads,
    swiglu,
)

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


def check_int(owner: str, name: str, value, minimum: int = 1) -> None:
    """Raise ValueError naming ``owner.name`` unless ``value`` is an int >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{owner}.{name} must be an int >= {minimum}, got {value!r}")


def check_float(owner: str, name: str, value, *, positive: bool = True, optional: bool = False) -> None:
    """Raise ValueError naming ``owner.name`` unless ``value`` is a finite (positive) number."""
    if value is None and optional:
        return
    ok = (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
          and (value > 0 if positive else value >= 0))
    if not ok:
        what = "a positive" if positive else "a non-negative"
        raise ValueError(f"{owner}.{name} must be {what} finite number{' or None' if optional else ''}, "
                         f"got {value!r}")


def check_dtype(owner: str, value) -> torch.dtype:
    if value not in DTYPES:
        raise ValueError(f"{owner}.dtype must be one of {sorted(DTYPES)}, got {value!r}")
    return DTYPES[value]


def soft_cap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """``cap · tanh(x / cap)``: smoothly clip ``x`` to (−cap, cap); identity when cap is None."""
    return x if cap is None else cap * torch.tanh(x / cap)


def swiglu_width(dim: int, multiplier: float = 1.0, multiple_of: int = 64) -> int:
    """``8/3 · dim · multiplier`` rounded up to a multiple of ``multiple_of``.

    >>> swiglu_width(576), swiglu_width(100, 1.0, 64)
    (1536, 320)
    """
    hidden = int(8 * dim / 3 * multiplier)
    return -(-hidden // multiple_of) * multiple_of


@dataclass(frozen=True)
class LlamaConfig:
    """Shape and options of a :class:`LlamaTransformer`.

    Attributes:
        vocab_size: number of token ids V.
        embedding_dim: model width D.
        num_blocks: number of transformer blocks.
        head_dim: width of one attention head; heads = ``embedding_dim // head_dim``
            unless ``num_heads`` is given.
        num_heads: number of query heads (checkpoints where heads · head_dim != D).
        num_kv_heads: number of key/value heads (grouped-query attention); default
            ``num_heads``. Must divide ``num_heads``.
        qk_norm: RMSNorm each query and key head before RoPE.
        causal: causal attention. With ``False`` the model cannot decode incrementally.
        theta: RoPE base frequency.
        ffn_multiple_of: the feed-forward width is rounded up to a multiple of this.
        ffn_dim_multiplier: the feed-forward width is ``8/3 · D · ffn_dim_multiplier``, rounded up.
        ffn_hidden_dim: an explicit feed-forward width (checkpoints); overrides the two above.
        use_bias: biases in every attention and feed-forward projection.
        norm_eps: epsilon of every RMSNorm.
        tie_embeddings: the output layer shares the input embedding matrix.
        dtype: parameter and activation dtype ("float32", "float64", "bfloat16", "float16").
        dropout_rate: dropout on attention weights and on both residual branches (training only).
        logits_soft_cap: soft-clip logits to ±cap (None: no cap).
        mask_across_document_boundaries: with ``segment_ids``, a token attends only to
            tokens of its own segment.
    """

    vocab_size: int
    embedding_dim: int
    num_blocks: int
    head_dim: int = 128
    num_heads: int | None = None
    num_kv_heads: int | None = None
    qk_norm: bool = False
    causal: bool = True
    theta: float = 10000.0
    ffn_multiple_of: int = 64
    ffn_dim_multiplier: float = 1.0
    ffn_hidden_dim: int | None = None
    use_bias: bool = False
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    dtype: str = "float32"
    dropout_rate: float = 0.0
    logits_soft_cap: float | None = None
    mask_across_document_boundaries: bool = False

    def __post_init__(self):
        name = "LlamaConfig"
        for field in ("vocab_size", "embedding_dim", "num_blocks", "head_dim", "ffn_multiple_of"):
            check_int(name, field, getattr(self, field))
        if self.head_dim % 2:
            raise ValueError(f"{name}.head_dim must be even for RoPE, got {self.head_dim}")
        if self.num_heads is None:
            if self.embedding_dim % self.head_dim:
                raise ValueError(f"{name}.embedding_dim={self.embedding_dim} is not divisible by "
                                 f"head_dim={self.head_dim}; change one, or give num_heads explicitly")
        else:
            check_int(name, "num_heads", self.num_heads)
        if self.num_kv_heads is not None:
            check_int(name, "num_kv_heads", self.num_kv_heads)
            if self.n_heads % self.num_kv_heads:
                raise ValueError(f"{name}.num_kv_heads={self.num_kv_heads} must divide the number of "
                                 f"heads ({self.n_heads})")
        if self.ffn_hidden_dim is not None:
            check_int(name, "ffn_hidden_dim", self.ffn_hidden_dim)
        check_float(name, "theta", self.theta)
        check_float(name, "ffn_dim_multiplier", self.ffn_dim_multiplier)
        check_float(name, "norm_eps", self.norm_eps)
        check_float(name, "logits_soft_cap", self.logits_soft_cap, optional=True)
        check_float(name, "dropout_rate", self.dropout_rate, positive=False)
        if self.dropout_rate >= 1:
            raise ValueError(f"{name}.dropout_rate must be in [0, 1), got {self.dropout_rate}")
        check_dtype(name, self.dtype)

    @property
    def n_heads(self) -> int:
        return self.num_heads if self.num_heads is not None else self.embedding_dim // self.head_dim

    @property
    def n_kv_heads(self) -> int:
        return self.num_kv_heads if self.num_kv_heads is not None else self.n_heads

    @property
    def ffn_dim(self) -> int:
        """Hidden width of the SwiGLU feed-forward layer.

        >>> LlamaConfig(vocab_size=10, embedding_dim=576, num_blocks=1, head_dim=64).ffn_dim
        1536
        """
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        return swiglu_width(self.embedding_dim, self.ffn_dim_multiplier, self.ffn_multiple_of)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclass(frozen=True)
class KVCache:
    """Keys and values of a context, per block. Never changed after construction.

    Attributes:
        keys: one ``(B, n_kv, T, hs)`` tensor per block.
        values: one ``(B, n_kv, T, hs)`` tensor per block.
        segment_ids: ``(B, T)`` document ids of the cached positions (only with
            ``mask_across_document_boundaries``), else None.
    """

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    segment_ids: torch.Tensor | None = None

    @property
    def length(self) -> int:
        """Number of cached positions T."""
        return self.keys[0].shape[2]

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes held by the keys and values (grows linearly with ``length``)."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def prefix(self, n: int) -> KVCache:
        """The cache of the first ``n`` positions (views, no copy)."""
        if not 0 <= n <= self.length:
            raise ValueError(f"n must be in 0..{self.length}, got {n}")
        seg = None if self.segment_ids is None else self.segment_ids[:, :n]
        return KVCache(tuple(k[:, :, :n] for k in self.keys), tuple(v[:, :, :n] for v in self.values), seg)

    def select(self, i: int) -> KVCache:
        """Row ``i`` as a batch of one (views, no copy)."""
        seg = None if self.segment_ids is None else self.segment_ids[i : i + 1]
        return KVCache(tuple(k[i : i + 1] for k in self.keys), tuple(v[i : i + 1] for v in self.values), seg)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables for ``positions`` (B, S): cos and sin of shape (B, 1, S, hs)."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    cos, sin = rope_tables(positions, inv_frequencies(head_dim, theta, work), dtype)  # (B, S, hs) each
    return cos[:, None], sin[:, None]


class SelfAttention(nn.Module):
    """Grouped-query self-attention with RoPE; returns the output and the full keys/values."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        D, hs, bias = config.embedding_dim, config.head_dim, config.use_bias
        self.q_proj = nn.Linear(D, self.n_heads * hs, bias=bias)
        self.k_proj = nn.Linear(D, self.n_kv_heads * hs, bias=bias)
        self.v_proj = nn.Linear(D, self.n_kv_heads * hs, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * hs, D, bias=bias)
        self.q_norm = nn.RMSNorm(hs, eps=config.norm_eps) if config.qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(hs, eps=config.norm_eps) if config.qk_norm else nn.Identity()
        self.dropout_rate = config.dropout_rate

    def forward(self, x, cos, sin, mask, past_k=None, past_v=None):
        """``mask``: from :func:`~genlm_bytes.models.layers.group_mask` (or None)."""
        q = split_heads(self.q_proj(x), self.n_heads, self.head_dim)  # (B, nh, S, hs)
        k = split_heads(self.k_proj(x), self.n_kv_heads, self.head_dim)  # (B, nkv, S, hs)
        v = split_heads(self.v_proj(x), self.n_kv_heads, self.head_dim)  # (B, nkv, S, hs)
        q, k = apply_rope(self.q_norm(q), cos, sin), apply_rope(self.k_norm(k), cos, sin)
        if past_k is not None:
            k = torch.cat([past_k, k], dim=2)  # (B, nkv, T, hs)
            v = torch.cat([past_v, v], dim=2)  # (B, nkv, T, hs)
        dropout = self.dropout_rate if self.training else 0.0
        y = attend(q, k, v, mask, dropout_p=dropout)  # (B, nh, S, hs)
        return self.o_proj(merge_heads(y)), k, v  # (B, S, D)


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = False):
        super().__init__()
        D, H = dim, hidden_dim
        self.gate_proj = nn.Linear(D, H, bias=bias)
        self.up_proj = nn.Linear(D, H, bias=bias)
        self.down_proj = nn.Linear(H, D, bias=bias)

    def forward(self, x):
        g, u, d = self.gate_proj, self.up_proj, self.down_proj
        return swiglu(x, g.weight, g.bias, u.weight, u.bias, d.weight, d.bias)  # (B, S, D)


class TransformerBlock(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.embedding_dim, eps=config.norm_eps)
        self.attn = SelfAttention(config)
        self.ffn_norm = nn.RMSNorm(config.embedding_dim, eps=config.norm_eps)
        self.ffn = SwiGLU(config.embedding_dim, config.ffn_dim, config.use_bias)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x, cos, sin, mask, past_k=None, past_v=None):
        a, k, v = self.attn(self.attn_norm(x), cos, sin, mask, past_k, past_v)
        x = x + self.dropout(a)  # (B, S, D)
        x = x + self.dropout(self.ffn(self.ffn_norm(x)))  # (B, S, D)
        return x, k, v


class LlamaTransformer(nn.Module):
    """A LLaMA-style decoder-only transformer.

    Args:
        config: the :class:`LlamaConfig`. Weights are initialized N(0, 0.02).
    """

    def __init__(self, config: LlamaConfig):
        super().__init__()
        if not isinstance(config, LlamaConfig):
            raise TypeError(f"config must be a LlamaConfig, got {type(config).__name__}")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.embedding_dim)
        self.blocks = nn.ModuleList(TransformerBlock(config) for _ in range(config.num_blocks))
        self.norm = nn.RMSNorm(config.embedding_dim, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.embedding_dim, config.vocab_size, bias=False)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif not name.endswith("norm.weight"):
                nn.init.normal_(p, std=0.02)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.to(config.torch_dtype)

    # -- input checks ---------------------------------------------------------------------------
    def _check_ids(self, input_ids) -> torch.Tensor:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
            got = f"shape {tuple(input_ids.shape)}" if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be an integer tensor of shape (B, S), got {got}")
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids has no tokens (S = 0)")
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= self.config.vocab_size):
            raise ValueError(f"input_ids has ids outside 0..{self.config.vocab_size - 1}")
        return input_ids

    def _check_segments(self, segment_ids, input_ids) -> torch.Tensor | None:
        if segment_ids is None:
            return None
        if not isinstance(segment_ids, torch.Tensor) or segment_ids.shape != input_ids.shape:
            got = tuple(segment_ids.shape) if isinstance(segment_ids, torch.Tensor) else type(segment_ids).__name__
            raise ValueError(f"segment_ids must have the shape of input_ids {tuple(input_ids.shape)}, got {got}")
        if not self.config.mask_across_document_boundaries:
            logger.debug("segment_ids ignored: config.mask_across_document_boundaries is False")
            return None
        return segment_ids

    # -- the computation ------------------------------------------------------------------------
    def _run(self, input_ids, positions, mask, past: KVCache | None):
        """Blocks over ``input_ids`` (B, S) at ``positions`` (B, S) with boolean ``mask`` (B|1, 1, S, T)."""
        x = self.embed(input_ids)  # (B, S, D)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.theta, x.dtype)  # (B, 1, S, hs)
        B, S = x.shape[:2]
        T = S + (past.length if past is not None else 0)  # keys: past + new
        mask = group_mask(mask, B, self.config.n_heads // self.config.n_kv_heads, S, T)  # once for every block
        keys, values = [], []
        for i, block in enumerate(self.blocks):
            past_k = past.keys[i] if past is not None else None
            past_v = past.values[i] if past is not None else None
            x, k, v = block(x, cos, sin, mask, past_k, past_v)  # x (B, S, D); k, v (B, nkv, T, hs)
            keys.append(k)
            values.append(v)
        logits = self.lm_head(self.norm(x))  # (B, S, V)
        return soft_cap(logits, self.config.logits_soft_cap), tuple(keys), tuple(values)

    def _mask(self, S: int, T: int, seg_q=None, seg_k=None, device=None) -> torch.Tensor | None:
        """Boolean attention mask (B|1, 1, S, T) for S new queries after T - S cached positions."""
        mask = None
        if self.config.causal:
            q_pos = torch.arange(T - S, T, device=device)[:, None]  # (S, 1)
            mask = (torch.arange(T, device=device)[None, :] <= q_pos)[None, None]  # (1, 1, S, T)
        if seg_q is not None:
            same = (seg_q[:, :, None] == seg_k[:, None, :])[:, None]  # (B, 1, S, T)
            mask = same if mask is None else mask & same
        return mask

    def forward(self, input_ids: torch.Tensor, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(B, S, V)`` of a whole sequence.

        Args:
            input_ids: ``(B, S)`` token ids.
            segment_ids: optional ``(B, S)`` document ids; used only when
                ``config.mask_across_document_boundaries``.
        """
        logits, _ = self._forward(input_ids, None, segment_ids)
        return logits

    def forward_cached(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                       segment_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, KVCache]:
        """Logits ``(B, S, V)`` of ``input_ids`` following ``cache``, and the extended cache.

        ``cache`` is not modified; the returned cache holds new tensors.

        Raises:
            ValueError: the model is not causal, or ``cache`` does not match the batch.
        """
        if not self.config.causal:
            raise ValueError("LlamaConfig.causal is False: a bidirectional model cannot decode incrementally "
                             "(call the model on the whole sequence instead)")
        return self._forward(input_ids, cache, segment_ids)

    def _forward(self, input_ids, cache, segment_ids):
        input_ids = self._check_ids(input_ids)
        segment_ids = self._check_segments(segment_ids, input_ids)
        B, S = input_ids.shape
        past = 0
        if cache is not None:
            if not isinstance(cache, KVCache) or len(cache.keys) != len(self.blocks):
                raise ValueError(f"cache must be a KVCache with {len(self.blocks)} blocks, got "
                                 f"{type(cache).__name__}")
            if cache.batch_size != B:
                raise ValueError(f"cache has batch size {cache.batch_size}, input_ids has {B}")
            past = cache.length
        seg_k = None
        if self.config.mask_across_document_boundaries:
            if segment_ids is None:
                segment_ids = torch.zeros_like(input_ids)
            old = cache.segment_ids if cache is not None and cache.segment_ids is not None else \
                torch.zeros(B, past, dtype=segment_ids.dtype, device=input_ids.device)
            seg_k = torch.cat([old.to(segment_ids.dtype), segment_ids], dim=1)  # (B, T)
        positions = torch.arange(past, past + S, device=input_ids.device)[None, :].expand(B, S)  # (B, S)
        mask = self._mask(S, past + S, segment_ids, seg_k, device=input_ids.device)
        logits, keys, values = self._run(input_ids, positions, mask, cache)
        return logits, KVCache(keys, values, seg_k)

    @torch.no_grad()
    def forward_ragged(self, token_lists: Sequence[Sequence[int]],
                       caches: Sequence[KVCache | None]) -> tuple[list[torch.Tensor], list[KVCache]]:
        """One padded forward for rows with different past and new lengths.

        Row i continues ``caches[i]`` (a batch-of-one cache, or None for no past) with the
        tokens ``token_lists[i]``. Pasts are right-padded with zeros and masked; new tokens
        are right-padded and their logits dropped; positions are each row's own.

        Returns:
            ``logits[i]`` of shape ``(n_i, V)`` and ``caches[i]`` extended by the ``n_i`` tokens.
        """
        if len(token_lists) != len(caches):
            raise ValueError(f"token_lists has {len(token_lists)} rows, caches has {len(caches)}")
        if not self.config.causal:
            raise ValueError("LlamaConfig.causal is False: a bidirectional model cannot decode incrementally")
        lens = [len(t) for t in token_lists]
        if not lens or min(lens) == 0:
            raise ValueError("token_lists must be a non-empty list of non-empty token lists")
        pasts = [0 if c is None else c.length for c in caches]
        if any(c is not None and c.batch_size != 1 for c in caches):
            raise ValueError("caches must hold batch-of-one KVCaches (use KVCache.select)")
        B, S, P = len(lens), max(lens), max(pasts)
        dev = self.embed.weight.device
        ids = torch.zeros(B, S, dtype=torch.long, device=dev)
        for i, toks in enumerate(token_lists):
            ids[i, : lens[i]] = torch.as_tensor(list(toks), dtype=torch.long)
        self._check_ids(ids)
        positions = torch.tensor(pasts, device=dev)[:, None] + torch.arange(S, device=dev)  # (B, S)
        # A query sees its row's real past (key j < past_i) and new keys up to itself.
        past_ok = torch.arange(P, device=dev)[None, :] < torch.tensor(pasts, device=dev)[:, None]  # (B, P)
        new_ok = torch.ones(S, S, dtype=torch.bool, device=dev).tril()  # (S, S)
        mask = torch.cat([past_ok[:, None, :].expand(B, S, P), new_ok[None].expand(B, S, S)], dim=2)[:, None]
        past = None
        if B == 1 and caches[0] is not None:
            past = caches[0]  # nothing to pad
        elif P > 0:
            def padded(rows: list[torch.Tensor | None]) -> torch.Tensor:  # (1, nkv, T_i, hs) each -> (B, nkv, P, hs)
                like = next(t for t in rows if t is not None)
                return torch.cat([like.new_zeros(1, like.shape[1], P, like.shape[3]) if t is None
                                  else F.pad(t, (0, 0, 0, P - t.shape[2])) for t in rows])

            past = KVCache(
                tuple(padded([None if c is None else c.keys[b] for c in caches]) for b in range(len(self.blocks))),
                tuple(padded([None if c is None else c.values[b] for c in caches]) for b in range(len(self.blocks))))
        logits, keys, values = self._run(ids, positions, mask, past)  # logits (B, S, V)
        out_logits = [logits[i, : lens[i]] for i in range(B)]
        if B == 1:
            return out_logits, [KVCache(keys, values)]  # already the row's past + its new tokens
        out_caches = []
        for i, c in enumerate(caches):
            new_k = [k[i : i + 1, :, P : P + lens[i]] for k in keys]  # each (1, nkv, n_i, hs)
            new_v = [v[i : i + 1, :, P : P + lens[i]] for v in values]
            if c is None:
                out_caches.append(KVCache(tuple(k.clone() for k in new_k), tuple(v.clone() for v in new_v)))
            else:
                out_caches.append(KVCache(tuple(torch.cat(kv, dim=2) for kv in zip(c.keys, new_k)),
                                          tuple(torch.cat(kv, dim=2) for kv in zip(c.values, new_v))))
        return out_logits, out_caches

    # -- loading --------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf_model) -> LlamaTransformer:
        """Build a LlamaTransformer from a loaded transformers LLaMA model, copying its weights.

        Args:
            hf_model: a ``transformers`` ``LlamaForCausalLM`` (``config.model_type == "llama"``).

        Raises:
            ValueError: the model is not a LLaMA, or uses a feature this class does not have
                (RoPE scaling, an activation other than SiLU, biases on only some layers).
        """
        hc = getattr(hf_model, "config", None)
        if getattr(hc, "model_type", None) != "llama":
            raise ValueError(f"hf_model must be a transformers LLaMA model (config.model_type 'llama'), "
                             f"got model_type {getattr(hc, 'model_type', None)!r}")
        rope = getattr(hc, "rope_parameters", None) or {}
        rope_type = rope.get("rope_type", "default")
        if rope_type != "default":
            raise ValueError(f"hf_model.config.rope_parameters['rope_type'] = {rope_type!r} is not supported "
                             f"(only 'default' RoPE)")
        theta = rope.get("rope_theta", getattr(hc, "rope_theta", 10000.0))
        if hc.hidden_act != "silu":
            raise ValueError(f"hf_model.config.hidden_act = {hc.hidden_act!r} is not supported (only 'silu')")
        attn_bias, mlp_bias = bool(hc.attention_bias), bool(getattr(hc, "mlp_bias", False))
        if attn_bias != mlp_bias:
            raise ValueError(f"hf_model.config has attention_bias={attn_bias} but mlp_bias={mlp_bias}; "
                             f"LlamaConfig.use_bias covers both")
        dtype = next(hf_model.parameters()).dtype
        dtype_name = next((k for k, v in DTYPES.items() if v == dtype), None)
        if dtype_name is None:
            raise ValueError(f"hf_model parameters have dtype {dtype}; load it as one of {sorted(DTYPES)}")
        head_dim = getattr(hc, "head_dim", None) or hc.hidden_size // hc.num_attention_heads
        config = LlamaConfig(
            vocab_size=hc.vocab_size, embedding_dim=hc.hidden_size, num_blocks=hc.num_hidden_layers,
            head_dim=head_dim, num_heads=hc.num_attention_heads, num_kv_heads=hc.num_key_value_heads,
            theta=float(theta), ffn_hidden_dim=hc.intermediate_size, use_bias=attn_bias,
            norm_eps=float(hc.rms_norm_eps), tie_embeddings=bool(hc.tie_word_embeddings), dtype=dtype_name)
        with torch.device("meta"):  # skip the random initialization: every weight is copied below
            model = cls(config)
        model.to_empty(device=next(hf_model.parameters()).device)
        if config.tie_embeddings:
            model.lm_head.weight = model.embed.weight
        source = dict(hf_model.named_parameters(remove_duplicate=False))
        with torch.no_grad():
            for name, p in model.named_parameters():
                src = source.get(_hf_name(name))
                if src is None or src.shape != p.shape:
                    got = None if src is None else tuple(src.shape)
                    raise ValueError(f"hf_model has no weight {_hf_name(name)!r} of shape {tuple(p.shape)} "
                                     f"(found {got})")
                p.copy_(src)
        return model.eval()


_HF_PREFIXES = {"embed.": "model.embed_tokens.", "blocks.": "model.layers.", "norm.": "model.norm."}
_HF_INFIXES = {".attn_norm.": ".input_layernorm.", ".ffn_norm.": ".post_attention_layernorm.",
               ".attn.": ".self_attn.", ".ffn.": ".mlp."}


def _hf_name(name: str) -> str:
    """Our parameter name -> the transformers LLaMA name.

    >>> _hf_name("blocks.0.attn.q_proj.weight")
    'model.layers.0.self_attn.q_proj.weight'
    """
    for ours, theirs in _HF_PREFIXES.items():
        if name.startswith(ours):
            name = theirs + name[len(ours):]
            break
    for ours, theirs in _HF_INFIXES.items():
        name = name.replace(ours, theirs)
    return name
