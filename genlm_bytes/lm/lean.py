"""A lean pass through a LLaMA-style transformers decoder, on the model's own weights.

transformers runs a decoder layer as a few dozen small modules and checks, each a
Python call with its own bookkeeping; on a CPU a one-token decode step of a small model
spends a large share of its time there rather than in the matrix products
(``benchmarks/bench_lean.py``). :class:`LeanDecoder` computes the same function with the
math of :mod:`genlm_bytes.models.layers` (RMSNorm, rotary embeddings, grouped-query
attention, SwiGLU), one torch call per operation, reading the weights of the transformers
modules in place (no copy), and the same cache protocol as the model (``past_key_values.layers[i].update(k, v)``
returns the layer's whole keys and values).

It is used only for models it recognizes by structure (``model_type`` llama, mistral
without a sliding window, qwen2 without sliding layers; SiLU; static rotary frequencies;
and Gemma 3's text decoder, :class:`LeanGemma3Decoder`),
and only after a check on a few tokens gives the same hidden states as the model's own
forward (:func:`lean_decoder`); anything else runs through transformers as before. The
backend also runs it only while the model is pristine (no hooks, no overridden forward,
no replaced module: :mod:`genlm_bytes.lm.hf.faithful`).
"""

from __future__ import annotations

import logging
import weakref

import torch
import torch.nn.functional as F

from genlm_bytes.lm.fused import FusedLayers
from genlm_bytes.lm.gemm import linear_fn, pack_groups, pack_weights
from genlm_bytes.lm.hugepages import new_memory_on_huge_pages
from genlm_bytes.models.layers import (
    apply_rope,
    attend,
    group_mask,
    merge_heads,
    outside_window,
    rms_norm,
    rope_tables,
    split_heads,
    swiglu,
)

logger = logging.getLogger(__name__)

MODEL_TYPES = ("llama", "mistral", "qwen2")
_LAYER_PARTS = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
_ATTN_PARTS = {"q_proj", "k_proj", "v_proj", "o_proj"}
_MLP_PARTS = {"gate_proj", "up_proj", "down_proj", "act_fn"}
_BODY_PARTS = {"embed_tokens", "layers", "norm", "rotary_emb"}
CHECK_TOLERANCE = 1e-4  # largest relative difference of hidden states accepted by the check
PACK_MAPPED_FROM = 256 << 10  # packed weights this large get mappings of their own (adjacent ones merge: huge pages)


class LeanDecoder:
    """``decoder(input_ids, attention_mask, position_ids, cache, before_layer)`` -> the final
    hidden states ``(B, T, H)``, as ``body(...).last_hidden_state`` would be.

    ``attention_mask``: None (one row: causal), ``(B, past + T)`` of 0/1 (padding; causal
    over the new tokens), or an additive ``(B, 1, T, past + T)`` float mask used as is.
    ``before_layer``: optional callable run before each layer (may raise to stop the pass; the
    backend stops its passes in the cache's ``update`` instead, see ``lm/hf/pass_cache.py``).
    """

    bucketed = True  # runs a batch's attention per bucket of rows (see LeanCache)
    _fused = None  # FusedLayers: a pass in three C calls a layer, on the weights' codes (lm/fused.py)

    def __init__(self, body, linear=F.linear):
        if not all(hasattr(body, part) for part in _BODY_PARTS):
            raise TypeError(f"LeanDecoder needs a LLaMA-style transformers decoder (with {sorted(_BODY_PARTS)}), "
                            f"got {type(body).__name__}; lean_decoder(model) checks a model first")
        self._shapes(body, linear)
        rot = body.rotary_emb
        self.inv_freq = rot.inv_freq
        self.rope_scale = float(getattr(rot, "attention_scaling", 1.0))
        self._tables = {}  # rotary tables by position, per frequency set (grown on demand)
        # The parameters each layer reads, looked up once (a module attribute costs a Python call;
        # the Parameter objects stay the model's own, so moving or loading the model is seen).
        self._weights = []
        self._groups = [layer_groups(layer) for layer in self.layers]  # (q, k, v) and (gate, up), or ()
        for layer in self.layers:
            at, mlp = layer.self_attn, layer.mlp
            n1, n2 = layer.input_layernorm, layer.post_attention_layernorm
            self._weights.append((
                n1.weight, n1.variance_epsilon, at.q_proj.weight, at.q_proj.bias, at.k_proj.weight,
                at.k_proj.bias, at.v_proj.weight, at.v_proj.bias, at.o_proj.weight, at.o_proj.bias,
                n2.weight, n2.variance_epsilon, mlp.gate_proj.weight, mlp.gate_proj.bias,
                mlp.up_proj.weight, mlp.up_proj.bias, mlp.down_proj.weight, mlp.down_proj.bias))
        self._fused = FusedLayers(self)

    def _shapes(self, body, linear) -> None:
        """The decoder, its layers, the attention's shapes (from the first layer), and the matrix
        product the layers run (``F.linear``, or :func:`genlm_bytes.lm.gemm.linear_fn`'s)."""
        self.body, self.linear = body, linear
        self.layers = list(body.layers)
        a = self.layers[0].self_attn
        self.head_dim = int(a.head_dim)
        self.groups = int(a.num_key_value_groups)
        self.scaling = float(a.scaling)
        self.heads = a.q_proj.out_features // self.head_dim
        self.kv_heads = a.k_proj.out_features // self.head_dim

    def _rope(self, position_ids: torch.Tensor, dtype, key="", inv_freq=None, scale=None):
        """cos and sin ``(B, 1, T, d)`` at ``position_ids``, from tables computed as transformers
        does (float32 angles, scaled, then cast); ``key``, ``inv_freq``, ``scale``: another set
        of frequencies (default: the model's one)."""
        inv = self.inv_freq if inv_freq is None else inv_freq
        need = int(position_ids.max()) + 1
        cos, sin = self._tables.get(key, (None, None))
        if cos is None or cos.shape[0] < need or cos.dtype != dtype or cos.device != position_ids.device:
            n = max(need, 2 * (0 if cos is None else cos.shape[0]), 256)
            cos, sin = self._tables[key] = rope_tables(torch.arange(n, device=position_ids.device), inv.float(),
                                                       dtype, self.rope_scale if scale is None else scale)  # (n, d)
        return cos[position_ids][:, None], sin[position_ids][:, None]

    def _mask(self, attention_mask, B: int, T: int, L: int, device):
        """None (attend to everything), or a mask broadcastable to ``(B, 1, T, L)``."""
        if attention_mask is not None and attention_mask.dim() == 4:
            return attention_mask
        if attention_mask is None and T == 1:
            return None
        q = torch.arange(T, device=device)[:, None] + (L - T)
        allowed = torch.arange(L, device=device)[None, :] <= q  # (T, L)
        if attention_mask is None:
            return allowed[None, None]
        return allowed[None, None] & attention_mask[:, None, None, :].bool()

    def _bucket_masks(self, attention_mask, buckets, T: int, device, sliding: bool = False,
                      grouped: bool = True) -> list:
        """Per bucket ``(r0, r1, Pb)``, the grouped mask of its rows: the 2-D ``attention_mask``
        ``(B, P + T)``'s rows ``[r0, r1)`` and last ``Pb + T`` slots (a row's past sits at the end of
        the batch's padding, and of its bucket's); ``sliding``: without the keys a window or more
        behind their query (``_windowed``, by the slots' distances: the pasts are left-padded);
        ``grouped`` False: as :meth:`_mask` gives it (``(n, 1, T, L)``), not for :func:`attend`."""
        P = attention_mask.shape[1] - T
        out = []
        for r0, r1, Pb in buckets:
            n, L = r1 - r0, Pb + T
            m = self._mask(attention_mask[r0:r1, P - Pb:], n, T, L, device)
            if sliding:
                m = self._windowed(m, T, L, None, None, device, False)
            out.append(group_mask(m, n, self.groups, T, L) if grouped else m)
        return out

    def _attend(self, layer, q, k, v, attention_mask, buckets, masks, sliding: bool = False):
        """Attention of a bucketed pass (see :class:`LeanCache`): ``(o (B, h, T, d), masks)``,
        ``masks`` made on the first layer (None before; ``sliding``: see :meth:`_bucket_masks`)."""
        kv = layer.update_buckets(k, v)
        if masks is None:
            masks = self._bucket_masks(attention_mask, buckets, q.shape[2], q.device, sliding)
        o = torch.cat([attend(q[r0:r1], K, V, m, self.scaling) for (r0, r1, _), (K, V), m in zip(buckets, kv, masks)])
        return o, masks

    @torch.inference_mode()
    def __call__(self, input_ids, attention_mask, position_ids, cache, before_layer=None,
                 key_positions=None) -> torch.Tensor:
        body = self.body
        x = F.embedding(input_ids, body.embed_tokens.weight)  # (B, T, H)
        B, T, _ = x.shape
        cos, sin = self._rope(position_ids, x.dtype)  # (B, 1, T, d) each
        h, hk, d, g, linear = self.heads, self.kv_heads, self.head_dim, self.groups, self.linear
        group = getattr(linear, "group", None)
        mask = None
        buckets = getattr(cache, "buckets", None)
        if self._fused is not None and self._fused.applies(x):
            out = self._fused.run(x, cos, sin, attention_mask, cache, before_layer)
            if out is not None:
                return rms_norm(out, body.norm.weight, body.norm.variance_epsilon)
        for i, (w1, e1, wq, bq, wk, bk, wv, bv, wo, bo, w2, e2, wg, bg, wu, bu, wd, bd) in enumerate(self._weights):
            if before_layer is not None:
                before_layer()
            y = rms_norm(x, w1, e1)  # (B, T, H)
            groups = self._groups[i]
            qkv = group(y, groups[0]) if group is not None and groups else None
            if qkv is not None:  # (one product; the queries and keys rotated at once)
                qk = apply_rope(split_heads(qkv[..., :(h + hk) * d], h + hk, d), cos, sin)
                q, k, v = qk[:, :h], qk[:, h:], split_heads(qkv[..., (h + hk) * d:], hk, d)
            else:
                q = apply_rope(split_heads(linear(y, wq, bq), h, d), cos, sin)  # (B, h, T, d)
                k = apply_rope(split_heads(linear(y, wk, bk), hk, d), cos, sin)  # (B, hk, T, d)
                v = split_heads(linear(y, wv, bv), hk, d)
            if buckets:
                o, mask = self._attend(cache.layers[i], q, k, v, attention_mask, buckets, mask)
            else:
                K, V = cache.layers[i].update(k, v)  # (B, hk, L, d)
                if i == 0:
                    L = K.shape[2]
                    mask = group_mask(self._mask(attention_mask, B, T, L, x.device), B, g, T, L)
                o = attend(q, K, V, mask, self.scaling)
            x = x + linear(merge_heads(o), wo, bo)
            z = rms_norm(x, w2, e2)
            gu = group(z, groups[1]) if group is not None and groups else None
            if gu is not None:
                n = gu.shape[-1] // 2
                x = x + linear(F.silu(gu[..., :n]) * gu[..., n:], wd, bd)
            else:
                x = x + swiglu(z, wg, bg, wu, bu, wd, bd, linear)
        n = body.norm
        return rms_norm(x, n.weight, n.variance_epsilon)


class LeanCache:
    """The cache a :class:`LeanDecoder` pass needs: ``layers[i].update(k, v)`` -> the layer's
    whole keys and values (no transformers ``Cache`` object to build per pass).

    ``buckets``: None, or ``(r0, r1, Pb)`` row ranges of a batch whose rows are sorted by past
    length (longest first), each left-padded to its own past ``Pb`` instead of the batch's:
    then ``layers[i].update_buckets(k, v)`` gives each range's keys and values, and attention
    runs per range (:meth:`LeanDecoder._attend`)."""

    __slots__ = ("buckets", "layers")

    def __init__(self, layers, buckets=None):
        self.layers = layers
        self.buckets = buckets


def gemma_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm: ``x / rms(x) * (1 + weight)``, computed in float32."""
    return F.rms_norm(x.float(), (x.shape[-1],), 1.0 + weight.float(), eps).type_as(x)


class LeanGemma3Decoder(LeanDecoder):
    """:class:`LeanDecoder` for Gemma 3's text decoder (``model_type`` ``gemma3_text``): the
    embedding scaled by ``sqrt(hidden)``, RMSNorms of ``1 + weight`` in float32 around both
    blocks and on the queries and keys, rotary tables per layer type (local and global bases),
    a GELU-tanh MLP, and sliding-window layers (the window masked by the positions of the
    queries and keys: ``key_positions`` ``(B, L)`` if given, else the slots' own; a 4-D mask
    without them is taken as given, as transformers does)."""

    bucketed = True  # (see LeanDecoder; a sliding layer's window masked per bucket)

    def __init__(self, body, linear=F.linear):
        self._shapes(body, linear)
        self.window = int(body.config.sliding_window)
        rot = body.rotary_emb
        self._rot = {t: (getattr(rot, f"{t}_inv_freq"), float(getattr(rot, f"{t}_attention_scaling")))
                     for t in sorted({layer.self_attn.layer_type for layer in self.layers})}
        self.inv_freq = next(iter(self._rot.values()))[0]  # (the device, for the check)
        self._tables = {}  # per layer type (see LeanDecoder._rope)
        self._weights = []
        self._groups = [layer_groups(layer) for layer in self.layers]
        for layer in self.layers:
            at, mlp = layer.self_attn, layer.mlp
            self._weights.append((
                at.layer_type == "sliding_attention", layer.input_layernorm, at.q_proj.weight, at.q_proj.bias,
                at.k_proj.weight, at.k_proj.bias, at.v_proj.weight, at.v_proj.bias, at.o_proj.weight, at.o_proj.bias,
                at.q_norm, at.k_norm, layer.post_attention_layernorm, layer.pre_feedforward_layernorm,
                layer.post_feedforward_layernorm, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight,
                at.layer_type))

    def _windowed(self, mask, T: int, L: int, position_ids, key_positions, device, given: bool):
        """``mask`` (from :meth:`_mask`) without the keys ``window`` or more positions before their
        query. A 4-D mask the caller gave (``given``) is taken as it is unless ``key_positions``
        say where its keys are (as transformers does); without them, a slot's distance is its
        position's (pasts are left-padded)."""
        if given and key_positions is None:
            return mask
        if key_positions is not None:
            q_pos, k_pos = position_ids, key_positions.to(device)
        else:
            q_pos, k_pos = torch.arange(L - T, L, device=device)[None], torch.arange(L, device=device)[None]
        if mask is None:  # (causal: one row, one new token)
            mask = (k_pos[:, None, :] <= q_pos[:, :, None])[:, None]
        return outside_window(mask, q_pos, k_pos, self.window)

    @torch.inference_mode()
    def __call__(self, input_ids, attention_mask, position_ids, cache, before_layer=None,
                 key_positions=None) -> torch.Tensor:
        body = self.body
        emb = body.embed_tokens
        x = F.embedding(input_ids, emb.weight) * emb.embed_scale.to(emb.weight.dtype)  # (B, T, H)
        B, T, _ = x.shape
        ropes = {k: self._rope(position_ids, x.dtype, k, *self._rot[k]) for k in self._rot}
        h, hk, d, g, linear = self.heads, self.kv_heads, self.head_dim, self.groups, self.linear
        group = getattr(linear, "group", None)
        buckets = getattr(cache, "buckets", None)
        masks = {}  # (sliding, keys) -> the grouped mask (a sliding cache may hold fewer keys); sliding -> per bucket
        for i, (sliding, n1, wq, bq, wk, bk, wv, bv, wo, bo, qn, kn, n2, n3, n4, wg, wu, wd, kind) \
                in enumerate(self._weights):
            if before_layer is not None:
                before_layer()
            cos, sin = ropes[kind]
            y = gemma_norm(x, n1.weight, n1.eps)
            groups = self._groups[i]
            qkv = group(y, groups[0]) if group is not None and groups else None
            if qkv is not None:  # (one product for the three)
                yq, yk, yv = qkv[..., :h * d], qkv[..., h * d:(h + hk) * d], qkv[..., (h + hk) * d:]
            else:
                yq, yk, yv = linear(y, wq, bq), linear(y, wk, bk), linear(y, wv, bv)
            q = apply_rope(gemma_norm(split_heads(yq, h, d), qn.weight, qn.eps), cos, sin)
            k = apply_rope(gemma_norm(split_heads(yk, hk, d), kn.weight, kn.eps), cos, sin)
            if buckets:  # (a ragged pass's rows padded per bucket: see LeanCache)
                o, masks[sliding] = self._attend(cache.layers[i], q, k, split_heads(yv, hk, d), attention_mask,
                                                 buckets, masks.get(sliding), sliding)
            else:
                K, V = cache.layers[i].update(k, split_heads(yv, hk, d))  # (B, hk, L, d)
                L = K.shape[2]
                mask = masks.get((sliding, L))
                if mask is None:
                    mask = self._mask(attention_mask, B, T, L, x.device)
                    if sliding:
                        given = attention_mask is not None and attention_mask.dim() == 4
                        mask = self._windowed(mask, T, L, position_ids, key_positions, x.device, given)
                    mask = masks[(sliding, L)] = group_mask(mask, B, g, T, L)
                o = attend(q, K, V, mask, self.scaling)
            o = linear(merge_heads(o), wo, bo)
            x = x + gemma_norm(o, n2.weight, n2.eps)
            z = gemma_norm(x, n3.weight, n3.eps)
            gu = group(z, groups[1]) if group is not None and groups else None
            if gu is not None:
                n = gu.shape[-1] // 2
                z = linear(F.gelu(gu[..., :n], approximate="tanh") * gu[..., n:], wd)
            else:
                z = linear(F.gelu(linear(z, wg), approximate="tanh") * linear(z, wu), wd)
            x = x + gemma_norm(z, n4.weight, n4.eps)
        n = body.norm
        return gemma_norm(x, n.weight, n.eps)


def decoder_of(hf_model):
    """The decoder stack of a transformers causal LM (what runs before the output layer)."""
    return hf_model.get_decoder() if hasattr(hf_model, "get_decoder") else getattr(hf_model, "base_model", None)


def _children(module) -> set[str]:
    return {name for name, _ in module.named_children()}


_GEMMA3_LAYER = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm"}


def _recognized_gemma3(body, config) -> str | None:
    """Why ``body`` is not a Gemma 3 text decoder :class:`LeanGemma3Decoder` computes (None: it is)."""
    if getattr(config, "hidden_activation", None) != "gelu_pytorch_tanh":
        return f"activation {getattr(config, 'hidden_activation', None)!r}"
    if getattr(config, "use_bidirectional_attention", False) or getattr(config, "attn_logit_softcapping", None):
        return "bidirectional or soft-capped attention"
    if not isinstance(getattr(config, "sliding_window", None), int):
        return "no sliding window"
    if _children(body) != _BODY_PARTS or type(body.embed_tokens).__name__ != "Gemma3TextScaledWordEmbedding":
        return "decoder parts"
    rot = body.rotary_emb
    for layer in getattr(body, "layers", []):
        a = layer.self_attn
        if _children(layer) != _GEMMA3_LAYER or _children(a) != _ATTN_PARTS | {"q_norm", "k_norm"}:
            return "layer parts"
        if a.layer_type not in ("sliding_attention", "full_attention") \
                or not isinstance(getattr(rot, f"{a.layer_type}_inv_freq", None), torch.Tensor) \
                or "dynamic" in str(getattr(rot, "rope_type", {}).get(a.layer_type, "default")):
            return "rotary embedding or layer type"
        if not all(isinstance(getattr(a, p), torch.nn.Linear) for p in _ATTN_PARTS) or any(
                getattr(layer.mlp, p).bias is not None for p in ("gate_proj", "up_proj", "down_proj")):
            return "projections"
        norms = (layer.input_layernorm, layer.post_attention_layernorm, layer.pre_feedforward_layernorm,
                 layer.post_feedforward_layernorm, a.q_norm, a.k_norm, body.norm)
        if any(type(n).__name__ != "Gemma3RMSNorm" or not hasattr(n, "eps") for n in norms):
            return "normalization"
    if not len(getattr(body, "layers", [])):
        return "no layers"
    return None


def _recognized(body, config) -> str | None:
    """Why ``body`` is not a decoder :class:`LeanDecoder` computes exactly (None: it is)."""
    if getattr(config, "model_type", None) == "gemma3_text":
        return _recognized_gemma3(body, config)
    if getattr(config, "model_type", None) not in MODEL_TYPES:
        return f"model_type {getattr(config, 'model_type', None)!r}"
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        return "sliding-window attention"
    types = getattr(config, "layer_types", None)
    if types is not None and any(t != "full_attention" for t in types):
        return "layers other than full attention"
    if getattr(config, "hidden_act", None) != "silu":
        return f"activation {getattr(config, 'hidden_act', None)!r}"
    if not _BODY_PARTS <= _children(body) or _children(body) - _BODY_PARTS:
        return "decoder parts"
    rot = body.rotary_emb
    rope_type = str(getattr(rot, "rope_type", "default"))
    if "dynamic" in rope_type or "longrope" in rope_type or not isinstance(getattr(rot, "inv_freq", None),
                                                                           torch.Tensor):
        return f"rotary embedding {rope_type!r}"
    layers = getattr(body, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        return "no layers"
    if len(layers) != getattr(config, "num_hidden_layers", len(layers)):
        return "layer count"
    for layer in layers:
        if _children(layer) != _LAYER_PARTS:
            return "layer parts"
        if _children(layer.self_attn) != _ATTN_PARTS or _children(layer.mlp) != _MLP_PARTS:
            return "attention or MLP parts"
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if (not type(norm).__name__.endswith("RMSNorm") or _children(norm)
                    or not hasattr(norm, "variance_epsilon")):
                return "normalization"
        a = layer.self_attn
        if not all(isinstance(getattr(a, p), torch.nn.Linear) for p in _ATTN_PARTS):
            return "attention projections"
        if not all(isinstance(getattr(layer.mlp, p), torch.nn.Linear) for p in ("gate_proj", "up_proj", "down_proj")):
            return "MLP projections"
    n = body.norm
    if not type(n).__name__.endswith("RMSNorm") or not hasattr(n, "variance_epsilon"):
        return "final normalization"
    return None


@torch.inference_mode()
def _agrees(lean: LeanDecoder, body, config) -> bool:
    """The lean pass gives the model's own hidden states on a few tokens: one row with a past
    (a cache written by a first pass), and two left-padded rows."""
    from transformers import DynamicCache

    dev = lean.inv_freq.device
    vocab = lean.body.embed_tokens.num_embeddings
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 6), generator=gen).to(dev)

    def hf(x, mask, pos, cache):
        return body(input_ids=x, attention_mask=mask, position_ids=pos, past_key_values=cache,
                    use_cache=True).last_hidden_state

    outs = []
    for fn in (hf, lean):
        c = DynamicCache(config=config)
        a = fn(ids[:1, :4], None, torch.arange(4, device=dev)[None], c)
        b = fn(ids[:1, 4:], None, torch.arange(4, 6, device=dev)[None], c)
        mask = torch.ones((2, 6), dtype=torch.long, device=dev)
        mask[0, :2] = 0
        pos = torch.stack([torch.arange(-2, 4), torch.arange(6)]).clamp(min=0).to(dev)
        p = fn(ids, mask, pos, DynamicCache(config=config))
        outs.append((a, b, p[0, 2:], p[1]))
    for x, y in zip(*outs):
        scale = max(1.0, float(x.abs().max()))
        if not torch.isfinite(y).all() or float((x - y).abs().max()) > CHECK_TOLERANCE * scale:
            return False
    return True


def layer_groups(layer) -> tuple:
    """The weights of a LLaMA-style decoder layer that multiply the same input, as groups packed
    together (:func:`~genlm_bytes.lm.gemm.pack_groups`): ``((q, k, v), (gate, up))``; ``()``
    where the layer has other parts, or biases (not stacked)."""
    at, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    try:
        qkv = (at.q_proj, at.k_proj, at.v_proj)
        gu = (mlp.gate_proj, mlp.up_proj)
    except AttributeError:
        return ()
    if not all(isinstance(m, torch.nn.Linear) and m.bias is None for m in qkv + gu):
        return ()
    return tuple(m.weight for m in qkv), tuple(m.weight for m in gu)


def model_groups(hf_model) -> list[tuple]:
    """The :func:`layer_groups` of every layer of the model's decoder."""
    body = decoder_of(hf_model)
    return [g for layer in getattr(body, "layers", ()) for g in layer_groups(layer)] if body is not None else []


def model_matrices(hf_model) -> list[torch.Tensor]:
    """The weights a lean pass multiplies by: every ``nn.Linear``'s of the decoder, and the
    output layer's."""
    body = decoder_of(hf_model)
    out = [m.weight for m in body.modules() if isinstance(m, torch.nn.Linear)] if body is not None else []
    head = hf_model.get_output_embeddings() if hasattr(hf_model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        out.append(head.weight)
    return out


def pack_model(hf_model, quantize: bool = False) -> int:
    """oneDNN's packed copies of :func:`model_matrices` where missing or stale, on huge pages
    (:func:`~genlm_bytes.lm.gemm.pack_weights`); the bytes packed. ``quantize``: weights that
    are 4- or 8-bit codes get their codes as their pack instead (:mod:`genlm_bytes.lm.qgemm`)."""
    from genlm_bytes.lm.hf.memory import mapped_fresh  # (lm.hf imports this module)

    with mapped_fresh(PACK_MAPPED_FROM), new_memory_on_huge_pages():
        return (pack_groups(model_groups(hf_model), quantize=quantize)
                + pack_weights(model_matrices(hf_model), quantize=quantize))


_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> the keys whose check passed


def lean_decoder(hf_model, onednn: bool = True, packed: bool = False,
                 quantized: bool = False) -> LeanDecoder | None:
    """A :class:`LeanDecoder` for ``hf_model``'s decoder, or None (not recognized, or the check
    on a few tokens disagrees with the model's own forward; logged at debug level). The check
    runs once per model (and again if its dtype, device or products changed). ``onednn``: its
    float32 CPU products through oneDNN (:mod:`genlm_bytes.lm.gemm`), else ``F.linear``;
    ``packed``: by oneDNN's packed copies of the decoder's and the output layer's weights,
    made here where missing or stale (:func:`~genlm_bytes.lm.gemm.pack_weights`, on huge pages);
    ``quantized`` (with ``packed``): weights that are 4- or 8-bit codes packed as their codes
    (:mod:`genlm_bytes.lm.qgemm`)."""
    body = decoder_of(hf_model)
    config = getattr(hf_model, "config", None)
    if body is None or config is None:
        return None
    why = _recognized(body, config)
    if why is not None:
        logger.debug("lean decoder not used: %s", why)
        return None
    w = body.embed_tokens.weight
    linear = linear_fn(onednn, packed)
    packed = packed and linear is not F.linear
    quantized = quantized and packed
    key = (w.dtype, w.device, w.data_ptr(), linear is F.linear, packed, quantized)
    try:
        if packed:
            pack_model(hf_model, quantize=quantized)
        lean = (LeanGemma3Decoder if config.model_type == "gemma3_text" else LeanDecoder)(body, linear)
        checked = _CHECKED.get(hf_model)
        if checked is not None and key in checked:
            return lean
        if _agrees(lean, body, config):
            _CHECKED[hf_model] = {key} | {k for k in (checked or ()) if k[:3] == key[:3]}
            return lean
        logger.debug("lean decoder not used: its hidden states differ from the model's")
    except Exception:
        logger.debug("lean decoder not used", exc_info=True)
    return None
