"""Grouped-query attention for passes through transformers' own decoder.

transformers' SDPA attention repeats the keys and values of a grouped-query model per query
head whenever a mask is given, which copies the whole past of every layer on every pass.
:func:`grouped_sdpa` computes the same attention with the query heads of a group stacked on
their shared key/value head (:func:`genlm_bytes.models.layers.attend`, the math the lean
decoder uses too); :class:`grouped_attention` switches a model set to run SDPA over to it for
the duration of one pass.

Sliding-window layers (Gemma 2/3, Mistral, Qwen2's sliding layers): the engine keeps every
layer's whole past, and the window is a mask. transformers builds it from a 2-D padding mask
itself; a tree pass's 4-D mask it takes as given for every layer, so the pass also names its
queries' and keys' positions (``grouped_attention(model, positions=...)``) and
:func:`grouped_sdpa` hides the keys ``sliding_window`` or more positions behind a query in the
layers that have a window.

Not handled: attention with dropout, soft-capping, position bias, or a mask that is not
``(B, 1, Q, L)``: those go to transformers' SDPA function unchanged (a window applied first).
"""

from __future__ import annotations

import functools
import threading

import torch

from genlm_bytes.models.layers import attend, group_mask, outside_window

GROUPED_SDPA = "genlm_grouped_sdpa"
_PASS = threading.local()  # the positions of the pass running in this thread (see grouped_attention)


@functools.cache
def register_grouped_sdpa() -> bool:
    """Register :func:`grouped_sdpa` with transformers (once); False if this version cannot."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    except ImportError:
        return False
    AttentionInterface.register(GROUPED_SDPA, grouped_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(GROUPED_SDPA, sdpa_mask)
    return True


def grouped_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' attention-function signature: queries ``(B, H, Q, d)``, keys and values
    ``(B, Hkv, L, d)`` -> ``((B, Q, H, d), None)``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    window = kwargs.get("sliding_window")
    if window is not None and attention_mask is not None and attention_mask.dim() == 4:
        attention_mask = windowed(attention_mask, int(window))
    g = getattr(module, "num_key_value_groups", 1)
    H, Q = query.shape[1], query.shape[2]
    plain = (g == 1 or attention_mask is None or dropout or kwargs.get("softcap") is not None
             or kwargs.get("position_bias") is not None or kwargs.get("cache") is not None
             or attention_mask.dim() != 4 or attention_mask.shape[1] != 1 or key.shape[1] * g != H)
    if plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    mask = group_mask(attention_mask, attention_mask.shape[0], g, Q, key.shape[2])  # (B|1, 1, g*Q, L)
    return attend(query, key, value, mask, scaling).transpose(1, 2).contiguous(), None


def windowed(mask: torch.Tensor, window: int) -> torch.Tensor:
    """``mask`` (a 4-D ``(B|1, 1, Q, L)`` mask of the running pass, bool or additive) without the
    keys ``window`` or more positions before their query; unchanged when the pass named no
    positions (a mask transformers built, already windowed) or no key is that far."""
    pos = getattr(_PASS, "positions", None)
    if pos is None:
        return mask
    q_pos, k_pos, done = pos
    key = (window, mask.dtype)
    if key not in done:
        if q_pos.shape[-1] != mask.shape[-2] or k_pos.shape[-1] != mask.shape[-1]:
            raise ValueError(f"the pass named {q_pos.shape[-1]} queries and {k_pos.shape[-1]} keys, "
                             f"its mask has {tuple(mask.shape[-2:])}")
        done[key] = outside_window(mask, q_pos, k_pos, window)
    return done[key]


class grouped_attention:
    """Within the block, ``model`` runs :func:`grouped_sdpa` where it was set to run SDPA.

    ``positions``: ``(query positions (B, Q), key positions (B, L))`` of a pass whose 4-D mask
    transformers will not window (a tree pass), for the layers with a sliding window."""

    def __init__(self, model, positions=None):
        self.cfg = getattr(model, "config", None)
        self.old = None
        self.positions = positions

    def __enter__(self):
        _PASS.positions = None if self.positions is None else (*self.positions, {})
        cfg = self.cfg
        if (cfg is not None and getattr(cfg, "_attn_implementation_internal", None) == "sdpa"
                and register_grouped_sdpa()):
            self.old = "sdpa"
            cfg._attn_implementation_internal = GROUPED_SDPA
        return self

    def __exit__(self, *exc):
        _PASS.positions = None
        if self.old is not None:
            self.cfg._attn_implementation_internal = self.old
            self.old = None
        return False
