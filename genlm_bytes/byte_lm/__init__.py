"""Byte-level language model states: token contexts, covers, and the beam."""

from genlm_bytes.byte_lm.beam import BeamParams, ByteBeamState
from genlm_bytes.byte_lm.lm_state import StatefulByteLM, StatefulTokenizedLM
from genlm_bytes.byte_lm.prompt import token_prompt
from genlm_bytes.byte_lm.trie_state import LazyTrieState

__all__ = ["BeamParams", "ByteBeamState", "LazyTrieState", "StatefulByteLM", "StatefulTokenizedLM", "token_prompt"]
