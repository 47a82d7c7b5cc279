"""Built-in architectures: a LLaMA-style transformer and an mLSTM recurrent LM, with AsyncLM backends.

- :mod:`genlm_bytes.models.llama`: :class:`LlamaConfig`, :class:`LlamaTransformer` (KV cache,
  ``from_hf`` for transformers LLaMA checkpoints).
- :mod:`genlm_bytes.models.mlstm`: the mLSTM cell (step, sequence and parallel forms),
  :class:`MLSTMConfig`, :class:`MLSTMLM` (fixed-size recurrent state).
- :mod:`genlm_bytes.models.backends`: :class:`AsyncLlama`, :class:`AsyncMLSTM`.

Importing this package loads torch only (no transformers).
"""

from genlm_bytes.models.backends import AsyncLlama, AsyncMLSTM, StatePrefixCache
from genlm_bytes.models.llama import KVCache, LlamaConfig, LlamaTransformer
from genlm_bytes.models.mlstm import (
    MLSTMLM,
    MLSTMConfig,
    MLSTMState,
    parallel_stabilized_fw,
    recurrent_sequence_fw,
    recurrent_step_fw,
)

__all__ = [
    "MLSTMLM",
    "AsyncLlama",
    "AsyncMLSTM",
    "KVCache",
    "LlamaConfig",
    "LlamaTransformer",
    "MLSTMConfig",
    "MLSTMState",
    "StatePrefixCache",
    "parallel_stabilized_fw",
    "recurrent_sequence_fw",
    "recurrent_step_fw",
]
