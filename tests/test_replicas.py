"""RayLM: replicas of the embedded model in Ray actors give the local model's answers, survive
a replica's death, fail clearly when none is left, and leave nothing running.

The tests marked ``ray`` start a local 2-CPU Ray (one module-scoped RayLM of 2 replicas,
1 torch thread each); they are skipped where Ray is not installed. The argument checks run
everywhere: they fail before Ray is imported.
"""

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from genlm_bytes import BeamParams, ByteBeamState, RayLM

HAS_RAY = importlib.util.find_spec("ray") is not None


def needs_ray(test):
    """Marked ``ray`` (and ``slow``); skipped where Ray is not installed."""
    for mark in (pytest.mark.ray, pytest.mark.slow,
                 pytest.mark.skipif(not HAS_RAY, reason="Ray is not installed (pip install 'genlm_bytes[ray]')")):
        test = mark(test)
    return test

N_BEAMS = 32
STEPS = 8
PARAMS = BeamParams(K=5, prune_threshold=0.05)
ROUTED_PER_RUN = []  # requests routed by the first run (the kill test strikes a third of the way in)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("kwargs, err, match", [
    ({"replicas": 0}, ValueError, "replicas must be at least 1"),
    ({"replicas": "2"}, TypeError, "replicas must be an int"),
    ({"replicas": True}, TypeError, "replicas must be an int"),
    ({"backend": "tgi"}, ValueError, "unknown backend 'tgi'"),
    ({"num_cpus": -1}, ValueError, "num_cpus must be a finite number >= 0"),
    ({"num_cpus": True}, TypeError, "num_cpus must be a number"),
    ({"num_gpus": "1"}, TypeError, "num_gpus must be a number"),
    ({"num_gpus": float("inf")}, ValueError, "num_gpus must be a finite number"),
    ({"address": 6379}, TypeError, "address must be a string"),
    ({"name": 3}, TypeError, "name must be a model folder"),
])
def test_bad_arguments_fail_before_anything_starts(kwargs, err, match):
    name = kwargs.pop("name", None)
    with pytest.raises(err, match=match):
        RayLM.from_name(name, **kwargs)
    if HAS_RAY:
        import ray

        assert not ray.is_initialized()


async def greedy_beams(lm, n: int = N_BEAMS, steps: int = STEPS) -> list:
    """``(bytes, logZ)`` of ``n`` greedy beams from distinct prompts, concurrently (errors returned)."""
    b0 = await ByteBeamState.initial(lm, PARAMS)

    async def one(i):
        state = await b0.prefill(f"Item {i}:".encode())
        out = b""
        for _ in range(steps):
            sym = int((await state.logp_next()).ps.argmax())
            if sym > 255:
                break
            out += bytes([sym])
            state = await (state.prune() << sym)
        return out, state.logZ

    return await asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True)


@pytest.fixture(scope="module")
def reference(embedded_lm):
    """The beams on one local AsyncTransformer."""
    embedded_lm.clear_cache()
    return asyncio.run(greedy_beams(embedded_lm))


@pytest.fixture(scope="module")
def ray_session():
    """A local 2-CPU Ray for this module."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_lm(ray_session):
    lm = RayLM.from_name(replicas=2, num_cpus=1)
    yield lm
    asyncio.run(lm.close())


@needs_ray
@pytest.mark.timeout(300)
def test_a_script_that_starts_its_own_ray_exits_and_leaves_nothing():
    """address=None with no Ray running: the RayLM starts a local Ray, `async with` ends it and
    the replica; the script exits (runs first: before this module's own Ray starts)."""
    script = textwrap.dedent("""
        import asyncio, json, ray
        from genlm_bytes import RayLM

        async def main():
            async with RayLM.from_name(replicas=1, num_cpus=1) as lm:
                node = ray._private.worker._global_node
                pids = [p.process.pid for ps in node.all_processes.values() for p in ps]
                pids.append(lm.replica_info[0]["pid"])
                row = await lm.next_token_logprobs([0, 504])
                print(json.dumps({"pids": pids, "argmax": int(row.argmax())}))

        asyncio.run(main())
    """)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", script], check=False, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["pids"] and 0 <= res["argmax"] < 49152
    alive = _outliving(res["pids"], 20)
    assert not alive, f"Ray processes {alive} outlived the script ({time.monotonic() - t0:.0f} s)"


@needs_ray
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
@pytest.mark.timeout(600)
def test_a_vllm_replica_gives_the_transformers_log_probs(embedded_lm):
    """backend="vllm": one AsyncVLLM replica (runs before this module's own Ray starts)."""
    import torch

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    contexts = [[0, 504], [0, 504, 3458, 314], [0, 19556, 905]]

    async def run():
        async with RayLM.from_name(replicas=1, backend="vllm", num_cpus=1, enforce_eager=True) as lm:
            return await lm.batch_next_token_logprobs(contexts)

    got = asyncio.run(run())
    want = torch.stack([embedded_lm.next_token_logprobs_sync(c) for c in contexts])
    assert got.shape == want.shape
    assert torch.allclose(got.float(), want.float(), atol=1e-3)


def _outliving(pids: list[int], seconds: float) -> list[int]:
    """Those of ``pids`` still running after waiting up to ``seconds`` for them to end."""
    deadline = time.monotonic() + seconds
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if _not_zombie(p)]
        time.sleep(0.2)
    return alive


def _not_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@needs_ray
def test_two_replicas_match_one_local_model(ray_lm, reference):
    assert [i["threads"] for i in ray_lm.replica_info] == [1, 1]
    ray_lm.clear_cache()
    got = asyncio.run(greedy_beams(ray_lm))
    for (b, z), (b_ref, z_ref) in zip(got, reference):
        assert b == b_ref
        assert z == pytest.approx(z_ref, abs=1e-4)
    assert len({b for b, _ in got}) > 1  # distinct prompts, not one answer
    stats = ray_lm.stats()
    assert all(s["forward_tokens"] > 0 for s in stats["replicas"])  # both replicas worked
    assert stats["hit_rates"]["requests"] > 0.5  # beams stayed on their replica
    assert stats["requests_sent"] > 2 * stats["actor_calls"]  # requests travel in batches
    ROUTED_PER_RUN.append(ray_lm.router.n_routed)


async def _kill_when(lm, replicas: list[int], routed: int) -> float:
    import ray

    while lm.router.n_routed < routed:
        await asyncio.sleep(0.02)
    for r in replicas:
        ray.kill(lm.replicas[r])
    return time.monotonic()


@needs_ray
@pytest.mark.timeout(300)
def test_a_replica_killed_mid_run_hands_its_beams_to_the_survivor(ray_lm, reference):
    assert ray_lm.alive == [True, True]
    ray_lm.clear_cache()
    routed = (ROUTED_PER_RUN[-1] if ROUTED_PER_RUN else 150) // 3  # a third into the run

    async def run():
        kill = asyncio.ensure_future(_kill_when(ray_lm, [0], routed))
        got = await greedy_beams(ray_lm)
        await kill
        return got

    got = asyncio.run(run())
    assert ray_lm.alive == [False, True]
    assert ray_lm.n_failovers > 0
    for (b, z), (b_ref, z_ref) in zip(got, reference):
        assert b == b_ref
        assert z == pytest.approx(z_ref, abs=1e-4)


@needs_ray
def test_close_ends_every_actor(ray_lm):
    import ray

    live = [r for r, ok in enumerate(ray_lm.alive) if ok]
    assert live  # the survivor of the test above, or both replicas when run alone
    pids = [ray_lm.replica_info[r]["pid"] for r in live]
    handles = list(ray_lm.replicas)
    asyncio.run(ray_lm.close())
    for h in handles:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(h.info.remote(), timeout=30)
    assert not _outliving(pids, 20)
    with pytest.raises(RuntimeError, match="closed"):
        ray_lm.next_token_logprobs_sync([0, 1])
    asyncio.run(ray_lm.close())  # a second close does nothing


@needs_ray
@pytest.mark.timeout(300)
def test_with_every_replica_dead_every_waiter_gets_a_runtime_error_quickly(ray_session):
    lm = RayLM.from_name(replicas=2, num_cpus=1)  # (the module's RayLM is closed by now)

    async def run():
        kill = asyncio.ensure_future(_kill_when(lm, [0, 1], 20))
        try:
            got = await asyncio.wait_for(greedy_beams(lm), 60)
            return got, time.monotonic() - await kill
        finally:
            await lm.close()

    got, after_kill = asyncio.run(run())
    assert all(isinstance(g, RuntimeError) and "replicas of this RayLM have died" in str(g) for g in got), got
    assert after_kill < 10


@needs_ray
def test_resources_no_node_has_fail_at_once(ray_session):
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="no node of the Ray cluster has num_cpus=1 and num_gpus=1"):
        RayLM.from_name(replicas=1, num_gpus=1)
    assert time.monotonic() - t0 < 30


@needs_ray
@pytest.mark.timeout(300)
def test_a_bad_backend_argument_is_the_backends_own_error(ray_session):
    with pytest.raises(ValueError, match="draft_tokens must be a non-negative int"):
        RayLM.from_name(replicas=1, num_cpus=1, draft_tokens=-1)
