"""genlm_bytes: byte-level language models from token-level ones, async and exact.

``import genlm_bytes`` loads numpy and torch only; transformers is imported when
an HF backend is built.
"""

import logging

from genlm_bytes.lm.base import AsyncLM
from genlm_bytes.lm.mock import MockLM
from genlm_bytes.symbols import EOS, EOT, N_SYMBOLS

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = ["AsyncLM", "MockLM", "EOS", "EOT", "N_SYMBOLS"]
