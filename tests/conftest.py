"""Shared fixtures: the mock LM (fast) and the embedded model (loaded once per session)."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(2)

from genlm_bytes import MockLM


@pytest.fixture
def mock_lm():
    return MockLM(seed=0)


@pytest.fixture(scope="session")
def embedded_lm():
    """The embedded SmolLM2-135M as an AsyncTransformer (shared by all tests: do not mutate settings)."""
    from genlm_bytes import load_model

    return load_model()


@pytest.fixture(scope="session")
def embedded_hf(embedded_lm):
    """(hf_model, hf_tokenizer) of the embedded model."""
    return embedded_lm.model, embedded_lm.tokenizer
