"""The HF backend: :class:`AsyncTransformer`, a transformers causal LM as a small engine.

One request, in the order the modules meet it:

1. ``backend.py`` (:class:`AsyncTransformer`): ``next_token_logprobs(ids)`` returns a cached
   row at once, else queues ``ids`` in the :class:`~genlm_bytes.batching.Batcher`, whose
   worker hands the waiting requests to the model's thread as one batch.
2. ``scheduler.py``: checks the model (``faithful.py``), finds each context's deepest cached
   past, splits long runs into chunks and groups rows into passes that fit the memory budget;
   a lone request may carry drafted tokens (``speculation.py``).
3. ``passes.py``: builds one pass's inputs (ragged rows: padding mask and positions; or a
   tree mask for a path and its alternatives), runs it (lean decoder, transformers' decoder,
   or the model's own forward: ``faithful.py`` decides) on a ``pass_cache.py`` cache that
   gathers the pasts layer by layer, and turns hidden states into log-prob rows.
4. ``kv.py``: stores the pass's keys/values (segments, whole contexts, arenas) in the
   ``prefix_cache.py`` trie, under the budget; ``memory.py`` hands freed heap pages back.
5. back in ``scheduler.py``: after a lone request, ``speculation.py`` queues a look-ahead pass
   for the context the caller will most likely ask for next.

``config.py`` holds every tuning knob (:class:`EngineConfig`); ``attention.py`` the grouped
attention used in transformers' own passes.
"""

from genlm_bytes.lm.hf.backend import AsyncTransformer
from genlm_bytes.lm.hf.config import EngineConfig

__all__ = ["AsyncTransformer", "EngineConfig"]
