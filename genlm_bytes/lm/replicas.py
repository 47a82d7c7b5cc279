"""RayLM: an AsyncLM whose requests are served by model replicas in Ray actors.

Each replica is a Ray actor holding one backend (``AsyncTransformer`` or ``AsyncVLLM``)
built from the same model name and arguments. The driver (the process that made the
``RayLM``) holds the byte vocabulary, built once from the tokenizer (the driver never loads
the weights), and decides where each request goes:

- routing (:class:`~genlm_bytes.lm.routing.PrefixRouter`): a context goes to the replica
  that served its longest prefix, whose cache holds that prefix's keys/values; a new prefix
  goes to the least loaded replica;
- batching: each replica has a :class:`~genlm_bytes.batching.Batcher`; one actor call
  carries the requests queued for it in one event-loop tick (and those queued while its
  previous call ran), and returns one ``(B, V)`` numpy array;
- faults: when a replica dies, the requests it held and every later one go to the survivors
  (the answer is a pure function of the context, so results do not change); when none is
  left, every waiter gets a ``RuntimeError``.

Not handled: ``prefetch`` (a byte-level state asks for each context as a request; the
replica still runs only the tokens its cache lacks), replicas spanning several GPUs of a
node (give the backend its own parallelism arguments instead), restarting dead replicas.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import math
import numbers
import os
import time
from collections import OrderedDict

import numpy as np
import torch

from genlm_bytes.batching import Batcher
from genlm_bytes.lm.base import GUESS_AHEAD, AsyncLM
from genlm_bytes.lm.routing import PrefixRouter

logger = logging.getLogger(__name__)

BACKENDS = ("transformers", "vllm")
INSTALL_HINT = "pip install 'genlm_bytes[ray]'"
REQUESTS_PER_CALL = 128  # contexts in one actor call: a (128, 49152) float32 result is 25 MB
ROWS_KEPT = 128  # log-prob rows the driver keeps: contexts asked for again (by other beams) skip the trip
START_TIMEOUT_S = 900.0  # for every replica to load its model (a large model on a busy cluster takes minutes)
CLOSE_TIMEOUT_S = 30.0  # for the backends to shut down (vLLM's engine takes seconds) before the actors are killed


def vocab_digest(byte_vocab) -> str:
    """A digest of a byte vocabulary, equal across processes (to check that replicas agree)."""
    h = hashlib.sha256()
    for b in byte_vocab:
        h.update(len(b).to_bytes(4, "little"))
        h.update(b)
    return h.hexdigest()


class Replica:
    """What one Ray actor runs: a backend, asked for batches of contexts.

    An error while building the backend is kept and raised by :meth:`info`, so the driver
    sees the backend's own ``TypeError``/``ValueError`` rather than a dead actor.
    """

    def __init__(self, name, backend: str, kwargs: dict, threads: int):
        torch.set_num_threads(threads)
        self.lm, self.error = None, None
        try:
            from genlm_bytes.lm.default import load_model

            if backend == "transformers":
                self.lm = load_model(name, **kwargs)
            else:  # the vLLM backend is imported only where it is asked for
                self.lm = load_model(name, backend=backend, **kwargs)
        except Exception as e:  # noqa: BLE001 - handed to the driver by info()
            self.error = e

    def info(self) -> dict:
        if self.error is not None:
            raise self.error
        return {"vocab_size": self.lm.vocab_size, "digest": vocab_digest(self.lm.byte_vocab),
                "eos_token_ids": list(self.lm.eos_token_ids),
                "initial_context": list(self.lm.initial_context),
                "threads": torch.get_num_threads(), "pid": os.getpid()}

    async def logprobs(self, requests: list) -> np.ndarray:
        """Log-probs ``(B, V)`` after the context of each ``(context, guess)`` request, computed
        concurrently (batched by the backend); ``guess``: the caller's ``GUESS_AHEAD`` (False
        while it reads a known text)."""
        rows = await asyncio.gather(*(self._one(ids, guess) for ids, guess in requests))
        return torch.stack(rows).numpy()

    async def _one(self, ids, guess: bool) -> torch.Tensor:
        GUESS_AHEAD.set(guess)  # (this task's own context)
        return await self.lm.next_token_logprobs(ids)

    def stats(self) -> dict:
        return {"forward_tokens": getattr(self.lm, "n_forward_tokens", None)}

    def clear_cache(self) -> None:
        self.lm.clear_cache()

    async def close(self) -> None:
        close = getattr(self.lm, "close", None)
        if close is not None:
            out = close()
            if asyncio.iscoroutine(out):
                await out


def _check_args(name, replicas, backend, address, num_cpus, num_gpus) -> None:
    if name is not None and not isinstance(name, (str, os.PathLike)):
        raise TypeError(f"name must be a model folder, a hub id or None, got {type(name).__name__}")
    if isinstance(replicas, bool) or not isinstance(replicas, int):
        raise TypeError(f"replicas must be an int, got {type(replicas).__name__}")
    if replicas < 1:
        raise ValueError(f"replicas must be at least 1, got {replicas}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(map(repr, BACKENDS))}")
    if address is not None and not isinstance(address, str):
        raise TypeError(f"address must be a string such as 'ray://head:10001' or 'auto', got "
                        f"{type(address).__name__}")
    for arg, value in (("num_cpus", num_cpus), ("num_gpus", num_gpus)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{arg} must be a number, got {type(value).__name__}")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{arg} must be a finite number >= 0, got {value!r}")


def driver_tokenizer(name):
    """The tokenizer of model ``name`` (None: the embedded model; or a name ``load_model`` knows, or a
    folder), loaded offline, without weights."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    from genlm_bytes.lm.default import DEFAULT_MODEL, NAMED_MODELS, named_tokenizer

    if name is None or name in NAMED_MODELS:
        return named_tokenizer(name or DEFAULT_MODEL)
    path = os.fspath(name)
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"cannot load the tokenizer of {path!r}: {str(e).splitlines()[0]}") from e


def _check_resources(ray, replicas: int, num_cpus: float, num_gpus: float) -> None:
    """ValueError if no node can ever hold one replica (Ray would wait for it forever)."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if not any(n.get("CPU", 0) >= num_cpus and n.get("GPU", 0) >= num_gpus for n in nodes):
        raise ValueError(f"no node of the Ray cluster has num_cpus={num_cpus} and num_gpus={num_gpus} for "
                         f"one replica (nodes: {[{k: n.get(k, 0) for k in ('CPU', 'GPU')} for n in nodes]})")
    total = ray.cluster_resources()
    if replicas * num_cpus > total.get("CPU", 0) or replicas * num_gpus > total.get("GPU", 0):
        logger.warning("%d replicas need %g CPUs and %g GPUs; the cluster has %g and %g now: some replicas "
                       "wait for resources", replicas, replicas * num_cpus, replicas * num_gpus,
                       total.get("CPU", 0), total.get("GPU", 0))


def _start(ray, handles: list) -> list[dict]:
    """Each replica's :meth:`Replica.info`, once all are ready; raises the first error."""
    refs = [h.info.remote() for h in handles]
    _, pending = ray.wait(refs, num_returns=len(refs), timeout=START_TIMEOUT_S)
    if pending:
        raise RuntimeError(f"{len(pending)} of {len(refs)} replicas were not ready after {START_TIMEOUT_S:.0f} s "
                           f"(not enough free resources in the cluster?)")
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:  # the backend's own error (bad model or arguments)
        raise (e.cause if isinstance(e.cause, Exception) else e) from None


def _kill(ray, handle) -> None:
    try:
        ray.kill(handle)
    except Exception as e:  # noqa: BLE001 - already gone
        logger.debug("ray.kill: %r", e)


class RayLM(AsyncLM):
    """Model replicas in Ray actors behind one :class:`AsyncLM` (see the module docstring).

    Build it with :meth:`from_name`; use it as any AsyncLM, then ``await lm.close()`` (or
    ``async with lm:``), which ends the actors (and the local Ray if this object started it).

    Attributes:
        replicas: the Ray actor handles, one per replica (dead ones included).
        alive: ``alive[i]``: replica ``i`` has not failed.
        router: the :class:`~genlm_bytes.lm.routing.PrefixRouter` (hit rates for benchmarks).
        replica_info: per replica: ``threads`` (torch threads), ``pid``, vocabulary size.
    """

    _trusted_output = True  # rows come from a backend's own checked output

    def __init__(self, replicas: list, *, byte_vocab, initial_context, eos_token_ids, tokenizer=None,
                 replica_info=None, owns_ray: bool = False):
        import ray

        if not replicas:
            raise ValueError("a RayLM needs at least one replica")
        super().__init__(byte_vocab=byte_vocab, initial_context=initial_context, eos_token_ids=eos_token_ids)
        self.replicas = list(replicas)
        self.alive = [True] * len(self.replicas)
        self.replica_info = list(replica_info or [{} for _ in self.replicas])
        self.router = PrefixRouter(len(self.replicas))
        self.tokenizer = tokenizer
        self.n_failovers = 0  # requests re-sent after their replica died
        self._ray = ray
        self._faults = (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError,
                        ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError)
        self._owns_ray = owns_ray
        self._closed = False
        self._load = [0] * len(self.replicas)  # requests in flight per replica
        self._rows: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._inflight: dict[tuple, asyncio.Task] = {}
        self._batchers = [Batcher(functools.partial(self._serve, r), max_batch_size=REQUESTS_PER_CALL,
                                  name=f"RayLM-replica{r}") for r in range(len(self.replicas))]

    @classmethod
    def from_name(cls, name=None, *, replicas: int = 2, backend: str = "transformers", address: str | None = None,
                  num_cpus: float = 1, num_gpus: float = 0, **backend_kwargs) -> RayLM:
        """Start ``replicas`` actors, each loading model ``name`` on ``backend``.

        Args:
            name: a model folder or hub id in the local cache; None: the embedded SmolLM2.
            replicas: how many actors (each loads the whole model).
            backend: ``"transformers"`` (``AsyncTransformer``) or ``"vllm"`` (``AsyncVLLM``).
            address: the Ray cluster to join (``"auto"``, ``"ray://host:10001"``, ...); None:
                ``$RAY_ADDRESS``, else the Ray started on this machine by ``ray start``, else a new
                local Ray (ended by :meth:`close`). An already initialized Ray is used as it is.
            num_cpus, num_gpus: Ray resources each replica reserves; its torch threads are
                ``max(1, int(num_cpus))``. With ``num_gpus > 0`` the transformers backend
                defaults to ``device="cuda"``.
            **backend_kwargs: passed to each backend (``batch_size``, ``initial_context``,
                vLLM engine arguments, ...).

        Raises:
            TypeError, ValueError: a bad argument (before anything starts), a model or tokenizer
                that cannot be loaded, a replica's resources that no node has, or replicas that
                disagree about the vocabulary.
            ImportError: Ray is not installed.
        """
        _check_args(name, replicas, backend, address, num_cpus, num_gpus)
        try:
            import ray
        except ImportError:
            raise ImportError(f"RayLM needs Ray; install it with:  {INSTALL_HINT}") from None
        tokenizer = driver_tokenizer(name)
        from genlm_bytes.lm.vocab import byte_vocab_from_tokenizer

        byte_vocab = byte_vocab_from_tokenizer(tokenizer)
        kwargs = dict(backend_kwargs)
        if backend == "transformers":
            kwargs.setdefault("byte_vocab", byte_vocab)  # built once, here
            if num_gpus > 0:
                kwargs.setdefault("device", "cuda")
        owns_ray = not ray.is_initialized()
        if owns_ray:
            ray.init(address=address)
        elif address is not None:
            logger.warning("Ray is already initialized in this process: address=%r is not used", address)
        handles = []
        try:
            _check_resources(ray, replicas, num_cpus, num_gpus)
            actor = ray.remote(Replica).options(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0)
            kwargs_ref = ray.put(kwargs)
            threads = max(1, int(num_cpus))
            handles = [actor.remote(name, backend, kwargs_ref, threads) for _ in range(replicas)]
            infos = _start(ray, handles)
            vocab_size = infos[0]["vocab_size"]
            byte_vocab = byte_vocab + [b""] * max(0, vocab_size - len(byte_vocab))  # a padded output layer
            if any(i["digest"] != vocab_digest(byte_vocab) for i in infos):
                raise ValueError(f"the replicas' vocabularies ({sorted({i['vocab_size'] for i in infos})} tokens) "
                                 f"differ from the tokenizer's ({len(byte_vocab)}) built in the driver")
        except BaseException:
            for h in handles:
                _kill(ray, h)
            if owns_ray:
                ray.shutdown()
            raise
        logger.info("RayLM: %d replicas of %s on %s ready (%s torch threads each)", replicas,
                    name or "the embedded model", backend, infos[0]["threads"])
        return cls(handles, byte_vocab=byte_vocab, initial_context=infos[0]["initial_context"],
                   eos_token_ids=infos[0]["eos_token_ids"], tokenizer=tokenizer, replica_info=infos,
                   owns_ray=owns_ray)

    # ---------------------------------------------------------------- queries
    async def next_token_logprobs(self, token_ids: list[int]) -> torch.Tensor:
        key = tuple(token_ids)
        row = self._rows.get(key)
        if row is not None:
            self._rows.move_to_end(key)
            return row
        # Callers asking for the same context share one request (so a replica's load counts contexts).
        loop = asyncio.get_running_loop()
        shared = self._inflight.get(key)
        if shared is None or shared.get_loop() is not loop:
            shared = self._inflight[key] = loop.create_task(self._fetch(key, GUESS_AHEAD.get()))
            shared.add_done_callback(functools.partial(self._landed, key))
        return await asyncio.shield(shared)

    def _landed(self, key: tuple, task: asyncio.Task) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled() and task.exception() is None:  # (marks an error retrieved)
            self._rows[key] = task.result()
            if len(self._rows) > ROWS_KEPT:
                self._rows.popitem(last=False)

    async def _fetch(self, key: tuple, guess: bool) -> torch.Tensor:
        """The row of ``key`` from a live replica, re-sent to another when its replica dies."""
        while True:
            if self._closed:
                raise RuntimeError("this RayLM is closed")
            if not any(self.alive):
                raise RuntimeError(f"all {len(self.replicas)} replicas of this RayLM have died; "
                                   f"build a new one (RayLM.from_name)")
            r = self.router.choose(key, self._load, self.alive)
            self._load[r] += 1
            try:
                return await self._batchers[r].submit(key, (key, guess))
            except self._faults as e:
                self._lost(r, e)
                self.n_failovers += 1
            finally:
                self._load[r] -= 1

    def _serve(self, r: int, requests: list[tuple]) -> list[torch.Tensor]:
        """One actor call for a batch of ``(context, guess)`` (in replica ``r``'s batcher thread):
        one row per context."""
        try:
            out = self._ray.get(self.replicas[r].logprobs.remote(requests))  # (B, V)
        except self._ray.exceptions.RayTaskError as e:  # the backend's own error: the same on any replica
            raise (e.cause if isinstance(e.cause, Exception) else e) from None
        return [torch.from_numpy(np.array(row)) for row in out]  # copies: the object store's array is read-only

    def _lost(self, r: int, err: BaseException) -> None:
        if not self.alive[r]:
            return
        self.alive[r] = False
        logger.warning("replica %d of %d died (%s); %d left", r, len(self.replicas),
                       str(err).splitlines()[0] if str(err) else type(err).__name__, sum(self.alive))
        _kill(self._ray, self.replicas[r])  # an unavailable replica may come back: make it final

    def encode_bytes(self, data: bytes) -> list[int] | None:
        if self.tokenizer is None:
            return None
        from genlm_bytes.lm.vocab import encode_bytes

        return encode_bytes(self.tokenizer, self.byte_vocab, data)

    def clear_cache(self) -> None:
        """Drop the driver's rows and every live replica's cache (and what the router knows)."""
        self._rows.clear()
        self.router = PrefixRouter(len(self.replicas))
        refs = {r: self.replicas[r].clear_cache.remote() for r in range(len(self.replicas)) if self.alive[r]}
        for r, ref in refs.items():
            try:
                self._ray.get(ref)
            except self._faults as e:
                self._lost(r, e)

    def stats(self) -> dict:
        """Routing hit rates, failovers, actor calls and the requests they carried, and each live
        replica's ``forward_tokens`` (the tokens its model ran, where the backend counts them)."""
        per = []
        for r, h in enumerate(self.replicas):
            s = {"alive": self.alive[r], "threads": self.replica_info[r].get("threads")}
            if self.alive[r]:
                try:
                    s.update(self._ray.get(h.stats.remote()))
                except self._faults:
                    pass
            per.append(s)
        return {"hit_rates": self.router.hit_rates(), "failovers": self.n_failovers,
                "actor_calls": sum(b.n_batches for b in self._batchers),
                "requests_sent": sum(b.n_requests for b in self._batchers), "replicas": per}

    # ---------------------------------------------------------------- closing
    async def close(self) -> None:
        """End the actors (after letting each backend shut down) and the local Ray if this
        object started it. Requests made afterwards raise ``RuntimeError``."""
        if self._closed:
            return
        self._closed = True
        ray = self._ray
        live = [h for h, ok in zip(self.replicas, self.alive) if ok]
        if live:
            done = asyncio.gather(*(h.close.remote() for h in live), return_exceptions=True)
            try:
                await asyncio.wait_for(done, CLOSE_TIMEOUT_S)
            except TimeoutError:
                logger.warning("replicas did not close within %.0f s; killing them", CLOSE_TIMEOUT_S)
        for r, h in enumerate(self.replicas):
            self.alive[r] = False
            _kill(ray, h)
        deadline = time.monotonic() + 5.0  # in-flight calls fail once their actor is gone
        while any(self._load) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        self._rows.clear()
        if self._owns_ray:
            ray.shutdown()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> bool:
        await self.close()
        return False
