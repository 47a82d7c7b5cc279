"""genlm_bytes: byte-level language models from token-level ones, async and exact.

``import genlm_bytes`` loads numpy and torch only; transformers is imported when
an HF backend is built.
"""

import logging

from genlm_bytes.byte_lm import (
    BeamParams,
    ByteBeamState,
    LazyTrieState,
    StatefulByteLM,
    StatefulTokenizedLM,
)
from genlm_bytes.dist import Chart, LazyByteProbs
from genlm_bytes.lm.base import AsyncLM
from genlm_bytes.lm.default import load_model
from genlm_bytes.lm.mock import MockLM
from genlm_bytes.symbols import EOS, EOT, N_SYMBOLS
from genlm_bytes.trie import AsyncTokenByteTrie, TokenByteTrie

logging.getLogger(__name__).addHandler(logging.NullHandler())

_CONSTRAINTS = ("Regex", "StringSet", "Predicate", "ConstrainedState", "ConstraintError", "Constraint")
_MODELS = ("LlamaConfig", "LlamaTransformer", "MLSTMConfig", "MLSTMLM", "AsyncLlama", "AsyncMLSTM")


def __getattr__(name):
    # Heavier pieces load on first use.
    if name == "AsyncTransformer":
        from genlm_bytes.lm.hf import AsyncTransformer

        return AsyncTransformer
    if name == "RayLM":
        from genlm_bytes.lm.replicas import RayLM

        return RayLM
    if name == "SamplingParams":
        from genlm_bytes.sampling import SamplingParams

        return SamplingParams
    if name in ("generate", "generate_tokens"):
        from genlm_bytes import generation

        return getattr(generation, name)
    if name in _CONSTRAINTS:
        from genlm_bytes import constraints

        return getattr(constraints, name)
    if name == "EnsembleState":
        from genlm_bytes.ensemble import EnsembleState

        return EnsembleState
    if name == "smc":
        from genlm_bytes.smc import smc

        return smc
    if name in _MODELS:
        from genlm_bytes import models

        return getattr(models, name)
    raise AttributeError(f"module 'genlm_bytes' has no attribute {name!r}")


__all__ = [
    "EOS",
    "EOT",
    "MLSTMLM",
    "N_SYMBOLS",
    "AsyncLM",
    "AsyncLlama",
    "AsyncMLSTM",
    "AsyncTokenByteTrie",
    "AsyncTransformer",
    "BeamParams",
    "ByteBeamState",
    "Chart",
    "ConstrainedState",
    "Constraint",
    "ConstraintError",
    "EnsembleState",
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
]
