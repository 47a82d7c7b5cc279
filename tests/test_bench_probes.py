"""The prefill floor of ``benchmarks/bench_prefill.py``: what the beam itself reads, and the
model positions those reads need (``benchmarks/probes.py``)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import probes

from genlm_bytes import BeamParams, ByteBeamState, MockLM


def test_positions_needed_counts_every_distinct_prefix_once():
    assert probes.positions_needed([]) == 0
    assert probes.positions_needed([(7,)]) == 1
    # (1,), (1, 2), (1, 2, 3), (1, 2, 4), (1, 5): shared prefixes count once, in any order.
    assert probes.positions_needed([(1, 2, 4), (1, 5), (1, 2, 3), (1, 2, 3)]) == 5
    # A context read after a longer one that contains it adds nothing.
    assert probes.positions_needed([(1, 2, 3), (1, 2)]) == 3
    assert probes.positions_needed([[1, 2], [3]]) == 3  # lists count like tuples


@pytest.mark.asyncio
async def test_recorder_sees_every_context_the_beam_reads_and_puts_the_method_back():
    lm = MockLM(seed=3)
    params = BeamParams(K=5, prune_threshold=0.05)
    data = b"the apple and the day"
    plain = await (await ByteBeamState.initial(lm, params)).prefill(data)

    served = []
    inner = lm.next_token_logprobs

    async def spy(ids, *a, **k):  # what the backend is asked, below the recorder
        served.append(tuple(ids))
        return await inner(ids, *a, **k)

    lm.next_token_logprobs = spy
    with probes.ContextRecorder(lm) as reads:
        recorded = await (await ByteBeamState.initial(lm, params)).prefill(data)
    assert lm.next_token_logprobs is spy  # an instance attribute there before is put back
    del lm.next_token_logprobs
    with probes.ContextRecorder(lm):
        pass
    assert "next_token_logprobs" not in vars(lm)  # and none is left behind where there was none

    assert recorded.logZ == pytest.approx(plain.logZ, abs=1e-9)  # recording changes nothing
    assert reads.contexts == served  # every read, in order
    assert reads.contexts and all(c[: len(lm.initial_context)] == tuple(lm.initial_context)
                                  for c in reads.contexts)
    # The beam reads the distribution of every prefix it extends, so its reads are prefix-closed:
    # the positions they need are the distinct contexts themselves.
    assert probes.positions_needed(reads.contexts) == len(set(reads.contexts))


def test_engine_floor_runs_the_positions_in_one_pass_of_equal_rows(embedded_lm, monkeypatch):
    """``common.engine_pass_seconds``: one pass of the engine over ``n`` positions, in rows of
    equal length (at most the text's), distinct contexts; None for a backend without a runner."""
    import common

    from genlm_bytes.lm.hf import AsyncTransformer

    lm = AsyncTransformer(embedded_lm.model, embedded_lm.tokenizer, byte_vocab=embedded_lm.byte_vocab,
                          initial_context=embedded_lm.initial_context, lookahead=False)
    seen = []
    inner = lm.runner.forward

    def forward(rows, *args, **kwargs):
        seen.append([len(ids) for ids, _, _ in rows])
        assert len({ids for ids, _, _ in rows}) == len(rows)
        return inner(rows, *args, **kwargs)

    monkeypatch.setattr(lm.runner, "forward", forward)
    ids = list(range(100, 130))  # 30 tokens
    t = common.engine_pass_seconds(lm, ids, 71, repeats=1)
    assert t is not None and t > 0
    assert seen == [[24, 24, 23]], "71 positions: three rows of at most 30, as equal as can be"
    assert not lm.has_logprobs(ids[:5]), "the cache is left cold"
    assert common.engine_pass_seconds(MockLM(seed=0), ids, 10) is None


@pytest.mark.asyncio
async def test_time_model_times_the_engines_passes_and_puts_them_back(embedded_lm):
    """``common.time_model``: the time inside the pass runner's passes (what ``bench_prefill``
    and ``bench_concurrency`` report as the passes alone), nothing for a backend without a
    runner, and ``unwrap`` leaves the runner as it was."""
    import time

    import common

    from genlm_bytes.lm.hf import AsyncTransformer

    lm = AsyncTransformer(embedded_lm.model, embedded_lm.tokenizer, byte_vocab=embedded_lm.byte_vocab,
                          initial_context=embedded_lm.initial_context, lookahead=False)
    assert "forward" not in vars(lm.runner)
    clock = common.time_model(lm)
    assert clock.wrapped
    t0 = time.perf_counter()
    await lm.next_token_logprobs([0, 504, 3037])  # one batched pass
    await lm.prefetch([0, 504, 3037, 314, 2101, 28], alternatives=[(4, (30,))], start=3)  # a tree pass
    wall = time.perf_counter() - t0
    assert clock.calls == 2 and [c["call"] for c in clock.log] == ["forward", "tree_pass"]
    assert clock.log[0]["rows"] == 1 and clock.log[0]["new_tokens"] == 3
    assert 0 < clock.seconds <= wall
    clock.unwrap()
    assert not clock.wrapped and "forward" not in vars(lm.runner) and "tree_pass" not in vars(lm.runner)
    before = clock.calls
    await lm.next_token_logprobs([0, 504, 3037, 7])
    assert clock.calls == before  # no longer timed
    mock = common.time_model(MockLM(seed=0))
    assert not mock.wrapped and mock.seconds == 0


def test_the_prompt_suites_are_broad_and_the_held_out_one_shares_no_prompt():
    """Both prompt suites of ``benchmarks/data`` load, have at least 24 prompts of many kinds
    with distinct names, and the held-out suite repeats no prompt of the main one."""
    import suite

    main = suite.load_prompts(suite.PROMPT_SUITE)
    held = suite.load_prompts(Path(suite.PROMPT_SUITE).with_name("prompts_heldout.json"))
    for prompts in (main, held):
        assert len(prompts) >= 24
        assert len({p["name"] for p in prompts}) == len(prompts)
        assert len({p["kind"] for p in prompts}) >= 12
        assert all(p["text"] for p in prompts)
    assert not {p["text"] for p in main} & {p["text"] for p in held}


def test_the_text_suites_are_broad_and_the_held_out_one_shares_no_text():
    """Both text suites load, each with at least 6 texts of several kinds (the issue's minimum),
    every text scorable (non-empty UTF-8), and the held-out suite repeats no text of the main
    one."""
    import suite

    main, held = suite.load_texts(suite.TEXT_SUITE), suite.load_texts(suite.HELDOUT_TEXTS)
    for texts in (main, held):
        assert len(texts) >= 6 and len({t["kind"] for t in texts}) >= 5
        assert all(suite.unscorable(t["data"]) is None for t in texts)
    assert len(held) >= 12
    assert not {t["data"] for t in main} & {t["data"] for t in held}
    assert not {t["name"] for t in main} & {t["name"] for t in held}


def test_a_text_folder_skips_what_it_cannot_score_and_says_why(tmp_path, capsys):
    """An empty or non-UTF-8 file is skipped with a line naming it and why; a folder of nothing
    else is a ValueError, not a traceback from the tokenizer later."""
    import suite

    (tmp_path / "a.txt").write_bytes(b"")
    (tmp_path / "b.bin").write_bytes(b"ok \xff\xfe then")
    (tmp_path / "c.txt").write_bytes("déjà vu".encode())
    texts = suite.load_texts(tmp_path)
    assert [t["name"] for t in texts] == ["c.txt"] and texts[0]["kind"] == "txt"
    err = capsys.readouterr().err
    assert "skipped a.txt: empty" in err and "skipped b.bin: not UTF-8 (byte 3" in err
    assert suite.unscorable(b"caf\xc3") == "not UTF-8 (byte 3: unexpected end of data)"
    (tmp_path / "c.txt").unlink()
    with pytest.raises(ValueError, match="can be scored"):
        suite.load_texts(tmp_path)
    with pytest.raises(FileNotFoundError, match="no texts"):
        suite.load_texts(tmp_path / "nowhere")


def test_results_go_where_the_name_says(tmp_path):
    """``write_json`` adds ``.json`` to a bare name only; a path given whole is written as is."""
    import json

    import common

    out = common.write_json(str(tmp_path / "run_a"), {"x": 1})
    assert out == tmp_path / "run_a.json" and json.loads(out.read_text()) == {"x": 1}
    out = common.write_json(str(tmp_path / "run_b.json"), {"y": 2})
    assert out == tmp_path / "run_b.json" and json.loads(out.read_text()) == {"y": 2}
