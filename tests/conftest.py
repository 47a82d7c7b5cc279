"""Shared fixtures: the mock LM (fast) and the embedded model (loaded once per session)."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(2)

from genlm_bytes import MockLM


@pytest.fixture
def one_torch_thread():
    """One intra-op thread for the test (modules that run many small passes use it: on a busy
    2-core machine two threads spin against other processes and a forward gets several times
    slower; the results and the behaviour tested do not depend on it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
