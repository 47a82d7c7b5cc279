"""Grouped-query attention for passes through transformers' own decoder.

transformers' SDPA attention repeats the keys and values of a grouped-query model per query
head whenever a mask is given, which copies the whole past of every layer on every pass.
:func:`grouped_sdpa` computes the same attention with the query heads of a group stacked on
their shared key/value head (:func:`genlm_bytes.models.layers.attend`, the math the lean
decoder uses too); :class:`grouped_attention` switches a model set to run SDPA over to it for
the duration of one pass.

Not handled: attention with dropout, soft-capping, position bias, or a mask that is not
``(B, 1, Q, L)``: those go to transformers' SDPA function unchanged.
"""

from __future__ import annotations

import functools

from genlm_bytes.models.layers import attend, group_mask

GROUPED_SDPA = "genlm_grouped_sdpa"


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


class grouped_attention:
    """Within the block, ``model`` runs :func:`grouped_sdpa` where it was set to run SDPA."""

    def __init__(self, model):
        self.cfg = getattr(model, "config", None)
        self.old = None

    def __enter__(self):
        cfg = self.cfg
        if (cfg is not None and getattr(cfg, "_attn_implementation_internal", None) == "sdpa"
                and register_grouped_sdpa()):
            self.old = "sdpa"
            cfg._attn_implementation_internal = GROUPED_SDPA
        return self

    def __exit__(self, *exc):
        if self.old is not None:
            self.cfg._attn_implementation_internal = self.old
            self.old = None
        return False
