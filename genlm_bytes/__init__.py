"""genlm_bytes: byte-level language models from token-level ones, async and exact.

``import genlm_bytes`` loads numpy and torch only; transformers is imported when
an HF backend is built.
"""

import importlib
import logging

from genlm_bytes.byte_lm import (
    BeamParams,
    ByteBeamState,
    LazyTrieState,
    StatefulByteLM,
    StatefulTokenizedLM,
    token_prompt,
)
from genlm_bytes.dist import Chart, LazyByteProbs
from genlm_bytes.lm.base import AsyncLM
from genlm_bytes.lm.default import load_model
from genlm_bytes.lm.mock import MockLM
from genlm_bytes.symbols import EOS, EOT, N_SYMBOLS
from genlm_bytes.trie import AsyncTokenByteTrie, TokenByteTrie

logging.getLogger(__name__).addHandler(logging.NullHandler())

# Heavier pieces load on first use: public name -> the module that defines it.
_LAZY = {
    "AsyncTransformer": "genlm_bytes.lm.hf",
    "EngineConfig": "genlm_bytes.lm.hf",
    "AsyncVLLM": "genlm_bytes.lm.vllm",  # (vllm itself is imported when an engine is built)
    "RayLM": "genlm_bytes.lm.replicas",  # (ray itself is imported when replicas start)
    "SamplingParams": "genlm_bytes.sampling",
    "generate": "genlm_bytes.generation",
    "generate_tokens": "genlm_bytes.generation",
    "smc": "genlm_bytes.smc",
    "EnsembleState": "genlm_bytes.ensemble",
    **dict.fromkeys(("Regex", "StringSet", "Predicate", "ConstrainedState", "ConstraintError", "Constraint",
                     "JsonSchema", "Grammar", "AllOf"), "genlm_bytes.constraints"),
    **dict.fromkeys(("LlamaConfig", "LlamaTransformer", "MLSTMConfig", "MLSTMLM", "AsyncLlama", "AsyncMLSTM"),
                    "genlm_bytes.models"),
}


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'genlm_bytes' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "EOS",
    "EOT",
    "MLSTMLM",
    "N_SYMBOLS",
    "AllOf",
    "AsyncLM",
    "AsyncLlama",
    "AsyncMLSTM",
    "AsyncTokenByteTrie",
    "AsyncTransformer",
    "AsyncVLLM",
    "BeamParams",
    "ByteBeamState",
    "Chart",
    "ConstrainedState",
    "Constraint",
    "ConstraintError",
    "EngineConfig",
    "EnsembleState",
    "Grammar",
    "JsonSchema",
    "LazyByteProbs",
    "LazyTrieState",
    "LlamaConfig",
    "LlamaTransformer",
    "MLSTMConfig",
    "MockLM",
    "Predicate",
    "RayLM",
    "Regex",
    "SamplingParams",
    "StatefulByteLM",
    "StatefulTokenizedLM",
    "StringSet",
    "TokenByteTrie",
    "generate",
    "generate_tokens",
    "load_model",
    "smc",
    "token_prompt",
]
