"""The LLaMA decoder math, written once: rotary embeddings, RMSNorm, grouped-query attention,
SwiGLU. Pure functions on tensors and weights.

Two callers share them: :class:`~genlm_bytes.models.llama.LlamaTransformer` (our own modules)
and :class:`~genlm_bytes.lm.lean.LeanDecoder` (a transformers LLaMA's weights read in place).
Shapes: ``B`` rows, ``T`` new tokens, ``L`` keys (past + new), ``h`` query heads, ``hk``
key/value heads, ``g = h // hk`` query heads per key/value head, ``d`` head width.

Not handled: RoPE scaling variants that change the frequencies with the position (dynamic,
longrope), sliding windows, attention soft-capping.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def inv_frequencies(head_dim: int, theta: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """RoPE inverse frequencies ``theta ** (-2i / d)`` for ``i < d / 2``: shape ``(d/2,)``.

    >>> inv_frequencies(4, 100.0).tolist()
    [1.0, 0.10000000149011612]
    """
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=dtype) / head_dim)


def rope_tables(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype,
                scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles at ``positions`` (any shape ``S``): each ``S + (d,)``.

    Angles are computed in ``inv_freq``'s dtype (float32, or float64 for a float64 model),
    as transformers does, then scaled by ``scale`` and cast to ``dtype``.
    """
    angles = positions.to(inv_freq.dtype)[..., None] * inv_freq  # S + (d/2,)
    angles = torch.cat((angles, angles), dim=-1)  # S + (d,)
    return (angles.cos() * scale).to(dtype), (angles.sin() * scale).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs ``(i, i + d/2)`` of ``x`` ``(B, heads, T, d)`` by the angles whose cos and
    sin are ``(B, 1, T, d)`` (the "rotate half" layout of Hugging Face checkpoints)."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, heads, T, d/2) each
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float | None) -> torch.Tensor:
    """``x / rms(x) * weight`` over the last dimension (torch's RMSNorm, as ``nn.RMSNorm``)."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def split_heads(y: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """``(B, T, heads * d)`` -> ``(B, heads, T, d)`` (a view)."""
    B, T, _ = y.shape
    return y.view(B, T, heads, head_dim).transpose(1, 2)


def merge_heads(o: torch.Tensor) -> torch.Tensor:
    """``(B, heads, T, d)`` -> ``(B, T, heads * d)``."""
    B, h, T, d = o.shape
    return o.transpose(1, 2).reshape(B, T, h * d)


def outside_window(mask: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, window: int) -> torch.Tensor:
    """``mask`` (bool, True = attend, or additive; broadcastable to ``(B, 1, Q, L)``) also hiding
    the keys ``window`` or more positions before their query (a sliding-window layer); queries'
    positions ``q_pos`` ``(B|1, Q)``, keys' ``k_pos`` ``(B|1, L)``. ``mask`` itself when no key
    is that far."""
    far = (q_pos[:, :, None] - k_pos[:, None, :] >= window)[:, None]  # (B|1, 1, Q, L)
    if not bool(far.any()):
        return mask
    return mask & ~far if mask.dtype == torch.bool else mask.masked_fill(far, float("-inf"))


def group_mask(mask: torch.Tensor | None, B: int, groups: int, T: int, L: int) -> torch.Tensor | None:
    """A mask broadcastable to ``(B, 1, T, L)`` (bool, True = attend, or additive float) as
    :func:`attend` needs it for ``groups`` query heads per key/value head: ``(B, 1, g * T, L)``.
    Build it once per pass, not per layer."""
    if mask is None or groups == 1:
        return mask
    return mask.expand(B, 1, T, L)[:, :, None].expand(B, 1, groups, T, L).reshape(B, 1, groups * T, L)


FEW_QUERIES = 16  # queries per key/value head up to which attend() multiplies instead of running SDPA


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
           scale: float | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """Grouped-query attention: queries ``(B, h, T, d)`` on keys and values ``(B, hk, L, d)``.

    The ``g`` query heads sharing a key/value head are stacked (``(B, hk, g * T, d)``) instead of
    the keys and values being repeated per head, which would copy every layer's past on every
    pass. ``mask``: None, or from :func:`group_mask`. Returns ``(B, h, T, d)``.
    """
    B, h, T, d = q.shape
    hk = k.shape[1]
    gT = (h // hk) * T
    if gT <= FEW_QUERIES and B > 1 and not dropout_p and q.device.type == "cpu":
        # A few queries per key/value head of a batch of rows (decoding): two batched products.
        # torch's CPU flash kernel costs ~3 us per (row, head) whatever the work: 32 rows of 56
        # keys took 200 us per layer, these 76-89 us (benchmarks/README.md, session 19).
        s = torch.matmul(q.reshape(B, hk, gT, d), k.transpose(-1, -2))  # (B, hk, g*T, L)
        s.mul_(d ** -0.5 if scale is None else scale)
        if mask is not None:
            # A hidden key gets the lowest finite score, not -inf: its weight is still exactly 0
            # wherever its query sees a key, and a query that sees none (a padding slot outside
            # every window) averages the values instead of giving NaN, which would reach the
            # other rows through its keys and values in the next layer (0 * NaN).
            low = torch.finfo(s.dtype).min
            s = torch.where(mask, s, low) if mask.dtype == torch.bool else s.add_(mask).clamp_min_(low)
        return torch.matmul(torch.softmax(s, dim=-1), v).reshape(B, h, T, d)
    o = F.scaled_dot_product_attention(q.reshape(B, hk, gT, d), k, v, attn_mask=mask,
                                       dropout_p=dropout_p, scale=scale)  # (B, hk, g*T, d)
    return o.reshape(B, h, T, d)


def swiglu(x: torch.Tensor, w_gate, b_gate, w_up, b_up, w_down, b_down, linear=F.linear) -> torch.Tensor:
    """The SwiGLU feed-forward ``down(silu(gate(x)) * up(x))``; biases may be None; ``linear``:
    the matrix product (``F.linear``'s signature)."""
    return linear(F.silu(linear(x, w_gate, b_gate)) * linear(x, w_up, b_up), w_down, b_down)
