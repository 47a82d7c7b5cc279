"""EngineConfig: every tuning knob of the HF engine, in one frozen, validated dataclass.

``AsyncTransformer(model, tok, config=EngineConfig(prefetch_chunk=64))`` changes one; tests
pass a config instead of patching module globals. The values trade speed against memory on a
CPU; what they were measured against is in ``benchmarks/README.md``. None changes a result:
every distribution is the model's own whatever the knobs say.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

DEFAULT_CACHE_BUDGET = 1 << 30  # 1 GiB: a long text's KV plus a beam's working set on a small model
DEFAULT_DRAFT_TOKENS = 2  # a pass of 2-3 tokens costs little more than one on a CPU (benchmarks/README.md)


@dataclass(frozen=True)
class EngineConfig:
    """Tuning knobs of :class:`~genlm_bytes.lm.hf.backend.AsyncTransformer`, grouped by the module
    whose mechanism they tune; each says why its value."""

    # scheduler / passes: how work is cut into passes
    prefetch_chunk: int = 512  # a long text's tokens per pass: weights read once for many tokens, temporaries small
    alt_chunk: int = 256  # alternatives per tree pass: cost is about linear in tokens, so larger saves little
    logp_chunk: int = 64  # output positions whose logits are in memory at once (12 MB at a 49k vocabulary; one
    # buffer the passes reuse, see passes.OutputLayer)
    head_pad: int = 16  # output-layer products of 5 to this many rows run padded to it (0: never): CPU
    # matrix products of a few rows by a large vocabulary's weights take a slow path (Gemma 3: 8 rows 65 ms,
    # 12 rows 89 ms, 16 rows 39 ms; benchmarks/README.md)
    prefetch_together: bool = True  # several short prefetches (AsyncLM.prefetch_many) run as one pass, their
    # pasts end to end (PassRunner.tree_many): a pass reads all the weights whatever its size (False: a pass each)
    onednn: bool = True  # float32 CPU products of lean passes and the output layer through oneDNN, not
    # F.linear's BLAS: 1.6-2.1x faster at every row count on the benchmarks' AMD CPU (lm/gemm.py); used
    # where the kernels it compiles (lm.gemm.kernel_bytes) fit a quarter of the cache budget
    packed_weights: bool = True  # with oneDNN, multiply by a copy of the weights in its own layout: a
    # second copy of them (not charged to the cache budget; made when it fits a quarter of the memory
    # available), for products 20-40% faster at 2 rows and more, rounded alike at every row count (lm/gemm.py)
    quantized_products: bool = True  # with packed weights, a matrix whose float32 weights are 4- or 8-bit codes
    # per group of 32 inputs (a model loaded from such a GGUF file) is packed as those codes and multiplied on
    # them, made into the very same weights on the fly: SmolLM2's products 0.38x the time at 1 row, 1.03x at
    # 256; its packs 109 MB instead of 513 (lm/qgemm.py). Packs belong to the weights: False keeps the codes
    # another engine on the same weights made
    pass_share: float = 0.2  # of the budget, for one pass's temporaries: leaves the cache its working set
    one_openmp_pool: bool = True  # free the caller's thread's OpenMP pool before handing work to the model's
    # thread (a CPU model on libgomp): two pools on 2 CPUs throttle every parallel region's spin, and a
    # one-token pass took 31 ms instead of 21; CPU engines also share one thread (lm/openmp.py)

    # kv: segments and arenas
    max_segments: int = 64  # a past chained from this many segments is stored whole by the next pass
    min_segments: int = 8  # ... from this many on a short past when generating (see KVStore.chain_full)
    arena_spare_min: int = 64  # spare slots of a lone request's arena: dozens of tokens before it moves (0: off)
    arena_spare_share: float = 0.25  # ... or this share of its context, whichever is more
    arena_budget_share: float = 0.25  # the most of the budget one arena may take (its spare slots sit unused)
    gather_chunk_bytes: int = 16 << 20  # a batched pass gathers its pasts this much at a time: fewer calls (0: a layer)
    bucket_slots: int = 128  # a lean batched pass pads its rows' pasts per bucket of similar lengths, not to the
    # longest, where a bucket saves this many key slots per layer (its own calls' cost; 0: never): 32 rows of
    # pasts of ~5-55 tokens gather and attend to half the slots (PassRunner.buckets)

    # backend: the byte level's working set, charged to the budget
    prepared_dists: int = 256  # distributions kept prepared at the default budget: a K=32 beam's reuse
    prepared_share: float = 0.125  # ... within this share of the budget (8 bytes a token each): a large
    # vocabulary's (Gemma 3: 2 MB each, 256 of them half of a 2 GiB budget) would leave the cache too little
    # for the keys/values its look-aheads branch off (hex ids: 3,703 -> 3,057 LM tokens, 66 -> 49 passes)
    speculation_window: int = 128  # token boundaries a prefill speculates per pass, from window_budget up
    window_budget: int = 512 << 20  # below it, the window shrinks in proportion (two windows of rows are cached)
    heap_share: float = 0.05  # of the budget, for free heap pages between two trims

    # speculation: drafts and look-ahead
    draft_max_new: int = 8  # draft only for a lone request with at most this many uncached tokens
    draft_search: int = 2048  # positions searched back for a prompt-lookup draft: bounded cost per pass
    draft_most: int = 8  # a prompt-lookup draft of a copy under way (the earlier occurrence matches its last m
    # tokens) runs min(m, this) tokens, not draft_tokens: a copied stretch costs a pass per few tokens
    sibling_top: int = 8  # likeliest tokens searched for longer siblings (" the" after " ")
    ahead_top: int = 64  # tokens a look-ahead's greedy byte walk considers: the rest hold little mass
    ahead_shorter: int = 2  # shorter tokens spelling the guess's start that a look-ahead also runs ...
    ahead_shorter_p: float = 0.01  # ... when at least this likely (a byte-level beam asks for them first)
    ahead_sibling: bool = True  # or the likeliest token after a longer sibling computed with the context
    ahead_group: int = 4  # generation batches up to this size get a look-ahead; larger are beams, rarely all right
    group_drafts: bool = True  # such a batch (and its look-ahead) also runs each row's prompt-lookup draft, as a
    # lone request does: a beam of a few covers copying text costs a pass per few tokens, not per token
    hint_tokens: int = 2  # hinted contexts (AsyncLM.hint_next) run with such a batch: a pass of 3 tokens costs ~1.1x one

    # memory: heap trims
    trim_after_bytes: int = 16 << 20  # trim after evictions freed this much: worth a trim's page faults
    trim_slack_bytes: int = 0  # ... or when the resident set exceeds the accounted memory by this much
    trim_time_share: float = 0.1  # the most of the passes' time spent on such trims

    def __post_init__(self):
        positive = {"prefetch_chunk", "alt_chunk", "logp_chunk", "max_segments", "min_segments",
                    "prepared_dists", "speculation_window", "window_budget", "draft_search", "sibling_top",
                    "ahead_top"}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.type == "bool":
                if not isinstance(v, bool):
                    raise TypeError(f"EngineConfig.{f.name} must be True or False, got {v!r}")
            elif f.type == "int":
                if isinstance(v, bool) or not isinstance(v, int) or v < (1 if f.name in positive else 0):
                    least = 1 if f.name in positive else 0
                    raise ValueError(f"EngineConfig.{f.name} must be an int >= {least}, got {v!r}")
            elif isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"EngineConfig.{f.name} must be a finite number >= 0, got {v!r}")
        for name in ("pass_share", "arena_budget_share", "heap_share", "ahead_shorter_p", "trim_time_share",
                     "prepared_share"):
            if getattr(self, name) > 1:
                raise ValueError(f"EngineConfig.{name} is a share and must be at most 1, got {getattr(self, name)!r}")

    @property
    def ahead_shorter_logp(self) -> float:
        """``log(ahead_shorter_p)`` (-inf for 0)."""
        return math.log(self.ahead_shorter_p) if self.ahead_shorter_p > 0 else -math.inf
