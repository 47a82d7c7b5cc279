"""Tests of the command line (genlm_bytes.cli: the parser, the commands, genlm_bytes.cli.format).

Layers: pure helpers; argument and input checks run in-process through
``main([...])``, with the model loader replaced by one that fails, so they
show the checks happen before any model loads; in-process runs on the
embedded model (the loader returns the session's ``embedded_lm``); and a few
subprocess runs of ``python -m genlm_bytes`` (each loads the model, ~5-10 s),
compared with the Python API and with an in-process run, which works while the
subprocess loads.
"""

import asyncio
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import genlm_bytes.cli.main as cli
import genlm_bytes.cli.score as cli_score
import genlm_bytes.cli.session as cli_session
from genlm_bytes import BeamParams, ByteBeamState
from genlm_bytes.cli.format import Utf8Writer, bits_per_byte
from genlm_bytes.sampling import SamplingParams

REPO = Path(__file__).resolve().parents[1]
PROSE = Path(__file__).resolve().parents[2] / "shared/bench/prose.txt"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8"}
TIMEOUT = 240  # seconds for one subprocess (model load included)
PROMPT = "The capital of France is"


# --------------------------------------------------------------------------- helpers


def start(*args: str, stdin: bytes | None = None) -> subprocess.Popen:
    """Start ``python -m genlm_bytes ARGS`` (collect it with :func:`finish`)."""
    proc = subprocess.Popen([sys.executable, "-m", "genlm_bytes", *args], cwd=REPO, env=ENV,
                            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdin_bytes = stdin
    return proc


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of a process from :func:`start`."""
    out, err = proc.communicate(proc.stdin_bytes, timeout=TIMEOUT)
    return proc.returncode, out.decode("utf-8"), err.decode("utf-8", "backslashreplace")


def assert_clean(err: str) -> None:
    assert "Traceback" not in err and "Exception ignored" not in err, err


def beam_params(lm) -> BeamParams:
    """The CLI's default beam."""
    return BeamParams(K=5, prune_threshold=0.05, eos_tokens=tuple(lm.byte_vocab[t] for t in lm.eos_token_ids))


async def api_sample(lm, prompt: str, n: int, params=None, **kwargs) -> bytes:
    """The bytes the Python API generates after ``prompt`` (without the prompt)."""
    beam = await ByteBeamState.initial(lm, beam_params(lm))
    return (await beam.sample(prompt.encode(), n, params, **kwargs))[len(prompt.encode()):]


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def no_model(monkeypatch):
    """Make loading a model a test failure: the checks must come first."""

    def fail(args, model=None):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(cli_session, "load_lm", fail)


@pytest.fixture
def cli_lm(monkeypatch, embedded_lm):
    """main() runs in-process on the session's embedded model."""
    monkeypatch.setattr(cli_session, "load_lm", lambda args, model=None: embedded_lm)
    return embedded_lm


# --------------------------------------------------------------------------- pure helpers


def test_utf8_writer_holds_an_incomplete_character_until_it_completes():
    out = io.StringIO()
    w = Utf8Writer(out)
    seen = []
    for byte in "né 🙂!".encode():
        w.write(bytes([byte]))
        seen.append(out.getvalue())
    assert seen == ["n", "n", "né", "né ", "né ", "né ", "né ", "né 🙂", "né 🙂!"]
    w.write(b"\xff")  # never valid UTF-8: shown as an escape, at once
    assert out.getvalue() == "né 🙂!\\xff"
    w.write(b"\xe2\x82")  # the start of '€', cut off by the end of generation
    assert out.getvalue() == "né 🙂!\\xff"
    w.close()
    assert out.getvalue() == "né 🙂!\\xff\\xe2\\x82"


def test_utf8_writer_escapes_what_the_terminal_cannot_encode():
    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding="ascii")
    w = Utf8Writer(out)
    w.write("é".encode())
    assert raw.getvalue() == b"\\xe9"


def test_bits_per_byte():
    assert bits_per_byte(-8 * math.log(2), 4) == pytest.approx(2.0)
    assert bits_per_byte(0.0, 0) is None


# --------------------------------------------------------------------------- bad input, in-process


@pytest.mark.parametrize("argv, expected", [
    (["generate", "x", "--top-p", "2"], "--top-p: must be in (0, 1]"),
    (["generate", "x", "--max-bytes", "-1"], "--max-bytes: must be an integer >= 0, got -1"),
    (["generate", "x", "--temperature", "nan"], "--temperature"),
    (["generate", "x", "--seed", "1.5"], "--seed"),
    (["generate", "x", "--greedy", "--top-k", "3"], "--greedy cannot be combined with --top-k"),
    (["generate", "x", "--stop", ""], "--stop must not be empty"),
    (["next", "x", "--top", "0"], "--top: must be an integer >= 1"),
    (["next", "x", "--prune", "1"], "--prune: must be in [0, 1)"),
    (["next", "x", "--device", "nonsense"], "is not a torch device"),
    (["score", "/nonexistent/input.txt"], "cannot read '/nonexistent/input.txt': No such file"),
    (["score", "."], "cannot read '.'"),
    (["next", "x", "--model", "{empty}"], "has no config.json"),
    (["next", "x", "--model", __file__], "is a file"),
    (["frobnicate"], "invalid choice"),
    (["next", "x", "--engine-arg", "tensor_parallel_size=2"], "--engine-arg is for --backend vllm"),
    (["next", "x", "--backend", "vllm", "--engine-arg", "enforce_eager"], "is KEY=VALUE"),
    (["next", "x", "--backend", "vllm", "--device", "cpu"], "--device is for --backend hf"),
    (["next", "x", "--backend", "gpu"], "invalid choice"),
])
def test_bad_input_is_one_line_and_exit_code_2_before_loading(capsys, no_model, tmp_path, argv, expected):
    argv = [a.replace("{empty}", str(tmp_path)) for a in argv]
    code, out, err = run_main(capsys, *argv)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("genlm-bytes"), err
    assert expected in err


def test_unloadable_model_folder_is_one_line_and_exit_code_2(capsys, tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    code, _, err = run_main(capsys, "next", "x", "--model", str(tmp_path))
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("genlm-bytes: error:") and str(tmp_path) in err, err


def test_help_exits_0(capsys):
    code, out, _ = run_main(capsys, "generate", "--help")
    assert code == 0
    assert "--max-bytes" in out and "--stop" in out


def test_console_script_is_installed():
    exe = shutil.which("genlm-bytes")
    if exe is None:
        pytest.skip("the genlm-bytes console script is not on PATH (package not installed)")
    proc = subprocess.run([exe, "score", "/nonexistent/input.txt"], capture_output=True, text=True, env=ENV,
                          timeout=TIMEOUT, check=False)
    assert proc.returncode == 2
    assert proc.stderr == "genlm-bytes: error: cannot read '/nonexistent/input.txt': No such file or directory\n"


# --------------------------------------------------------------------------- in-process on the model


@pytest.mark.slow
def test_score_stdin_that_is_not_utf8_is_scored_as_bytes(capsys, monkeypatch, cli_lm):
    data = b"caf\xe9 \x80 ok"  # Latin-1, and a lone continuation byte
    # The session's model: rows earlier tests cached may be evicted and recomputed in other pass
    # shapes (float32, ~1e-6 apart); from an empty cache the API reads the rows the CLI computed.
    cli_lm.clear_cache()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    code, out, err = run_main(capsys, "score", "--json")
    assert code == 0, err
    result = json.loads(out)

    async def api():
        return (await (await ByteBeamState.initial(cli_lm, beam_params(cli_lm))).prefill(data)).logZ

    logZ = asyncio.run(api())
    assert result["n_bytes"] == len(data)
    assert result["logp_nats"] == pytest.approx(logZ, abs=1e-6)
    assert result["bits_per_byte"] == pytest.approx(-logZ / math.log(2) / len(data), abs=1e-9)
    assert result["zero_probability_at"] is None


@pytest.mark.slow
def test_score_of_bytes_the_model_cannot_produce_is_probability_0(capsys, monkeypatch, cli_lm):
    assert bytes([0xFF]) not in cli_lm.byte_vocab  # no token of SmolLM2 holds byte 0xff
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"ok \xff ok")))
    code, out, err = run_main(capsys, "score", "--json")
    assert code == 0
    result = json.loads(out)
    assert result["logp_nats"] is None and result["bits_per_byte"] is None
    assert result["zero_probability_at"] == 3
    assert err == "genlm-bytes: warning: probability 0: no token sequence of the model covers byte 0xff at offset 3\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"ok \xff ok")))
    code, out, err = run_main(capsys, "next", "-")
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "probability 0" in err and "offset 3" in err


@pytest.mark.slow
def test_score_shows_a_progress_bar_for_long_inputs(capsys, monkeypatch, cli_lm, tmp_path):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    path = tmp_path / "in.txt"
    path.write_bytes(b"A progress bar for this short text.")
    assert cli.main(["score", str(path)]) == 0  # short input: no bar
    out, err = capsys.readouterr()
    assert "bits per byte" in out and err == ""
    monkeypatch.setattr(cli_score, "PROGRESS_MIN_BYTES", 8)
    assert cli.main(["score", str(path)]) == 0  # piped stderr: a bar too
    out, err = capsys.readouterr()
    assert "bits per byte" in out and "scoring" in err
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert cli.main(["score", str(path)]) == 0
    assert "scoring" in sys.stderr.getvalue()


@pytest.mark.slow
def test_generate_stops_after_the_stop_string(capsys, cli_lm):
    code, out, err = run_main(capsys, "generate", PROMPT, "--greedy", "--stop", "Paris", "--max-bytes", "50")
    assert code == 0
    assert out == " Paris"
    assert err.count("\n") == 1 and "6 bytes" in err and "stopped by --stop" in err, err


@pytest.mark.slow
def test_generate_different_seeds_give_different_text(capsys, cli_lm):
    outs = [run_main(capsys, "generate", "Once upon a time", "--seed", s, "--max-bytes", "30")[1]
            for s in ("1", "2")]
    assert outs[0] != outs[1]


# --------------------------------------------------------------------------- subprocesses on the model


@pytest.mark.slow
async def test_next_ranks_a_space_first_after_the_capital_of_france_is(embedded_lm):
    proc = start("next", PROMPT, "--top", "5")
    beam = await (await ByteBeamState.initial(embedded_lm, beam_params(embedded_lm))).prefill(PROMPT.encode())
    code, out, err = finish(proc)
    assert code == 0, err
    assert_clean(err)
    lines = out.splitlines()
    assert len(lines) == 6
    logp = float(re.match(r"log P\(text\) = (-?\d+\.\d+) nats \(24 bytes", lines[0]).group(1))
    assert logp == pytest.approx(beam.logZ, abs=1e-3)
    assert lines[1].startswith(" 1  b' '"), out
    assert lines[2].startswith(" 2  "), out
    probs = [float(line.split()[-1]) for line in lines[1:]]
    assert probs == sorted(probs, reverse=True) and probs[0] > 0.9


@pytest.mark.slow
async def test_score_bits_per_byte_matches_the_python_api(embedded_lm):
    if not PROSE.is_file():
        pytest.skip(f"{PROSE} is missing")
    proc = start("score", str(PROSE), "--json")
    data = PROSE.read_bytes()
    beam = await (await ByteBeamState.initial(embedded_lm, beam_params(embedded_lm))).prefill(data)
    code, out, err = finish(proc)
    assert code == 0, err
    assert_clean(err)
    result = json.loads(out)
    assert result["n_bytes"] == len(data) == 597
    assert result["bits_per_byte"] == pytest.approx(-beam.logZ / math.log(2) / len(data), abs=1e-3)
    assert result["logp_nats"] == pytest.approx(beam.logZ, abs=1e-2)
    assert result["seconds"] > 0


@pytest.mark.slow
def test_generate_greedy_is_deterministic_and_matches_the_api(capsys, cli_lm):
    argv = ["generate", PROMPT, "--greedy", "--max-bytes", "40"]
    proc = start(*argv)  # one run in a fresh process, one in this one
    code, out, _ = run_main(capsys, *argv)
    expected = asyncio.run(api_sample(cli_lm, PROMPT, 40, greedy=True))
    code_sub, out_sub, err_sub = finish(proc)
    assert code == code_sub == 0, err_sub
    assert_clean(err_sub)
    assert out_sub == out == expected.decode("utf-8", "backslashreplace")
    assert re.fullmatch(r"genlm-bytes: 40 bytes in [\d.]+ s \([\d.]+ bytes/s\), stopped by --max-bytes\n",
                        err_sub), err_sub


@pytest.mark.slow
def test_generate_seed_makes_sampling_reproducible(capsys, cli_lm):
    opts = ["--seed", "3", "--temperature", "0.8", "--top-k", "20", "--top-p", "0.95", "--max-bytes", "40"]
    prompt = "Once upon a time"
    proc = start("generate", "-", *opts, stdin=prompt.encode())  # the prompt from stdin here
    code, out, _ = run_main(capsys, "generate", prompt, *opts)
    params = SamplingParams(temperature=0.8, top_k=20, top_p=0.95)
    expected = asyncio.run(api_sample(cli_lm, prompt, 40, params, rng=3))
    code_sub, out_sub, err_sub = finish(proc)
    assert code == code_sub == 0, err_sub
    assert_clean(err_sub)
    assert out_sub == out == expected.decode("utf-8", "backslashreplace")


@pytest.mark.slow
def test_ctrl_c_during_generation_keeps_the_output_and_exits_130():
    proc = start("generate", PROMPT, "--greedy", "--max-bytes", "100000")
    first = proc.stdout.read(len(b" Paris"))  # blocks until generation has produced that much
    assert first, proc.communicate(timeout=TIMEOUT)[1].decode()
    proc.send_signal(signal.SIGINT)
    code, out, err = finish(proc)
    assert code == 130
    assert_clean(err)
    assert (first.decode() + out).startswith(" Paris")
    assert re.fullmatch(r"genlm-bytes: \d+ bytes in [\d.]+ s \(.*\), stopped by Ctrl-C\n", err), err


# --------------------------------------------------------------------------- ensembles


@pytest.mark.parametrize("argv, expected", [
    (["next", "x", "--ensemble", "mixture"], "--ensemble and --weights need two or more --model"),
    (["next", "x", "--model", "smollm2-135m", "--weights", "1"], "need two or more --model"),
    (["next", "x", "--model", "a", "--model", "b", "--weights", "0.5"], "1 entries for 2 members"),
    (["next", "x", "--model", "a", "--model", "b", "--weights", "1,-1"], "mixture weights must be positive"),
    (["next", "x", "--model", "a", "--model", "b", "--weights", "1,x"], "--weights: expected numbers"),
    (["next", "x", "--model", "a", "--model", "b", "--ensemble", "sum"], "invalid choice"),
])
def test_bad_ensemble_input_is_one_line_and_exit_code_2_before_loading(capsys, no_model, argv, expected):
    code, out, err = run_main(capsys, *argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("genlm-bytes"), err
    assert expected in err


def test_ensembles_of_one_model_twice_read_as_the_model(capsys, cli_lm, tmp_path):
    """A mixture of a model with itself is the model; so is a product with weights summing to 1."""
    path = tmp_path / "t.txt"
    path.write_bytes(b"An apple a day keeps the doctor away.")
    two = ["--model", "smollm2-135m", "--model", "smollm2-135m"]
    code, out, _ = run_main(capsys, "score", str(path), "--json")
    alone = json.loads(out)
    code_mix, out_mix, _ = run_main(capsys, "score", str(path), "--json", *two, "--weights", "0.3,0.7")
    mix = json.loads(out_mix)
    assert code == code_mix == 0
    assert mix["logp_nats"] == pytest.approx(alone["logp_nats"], abs=1e-6)
    assert mix["ensemble"] == "mixture" and mix["weights"] == [0.3, 0.7]
    _, top1, _ = run_main(capsys, "next", "The capital of France is", "--top", "3")
    _, top2, _ = run_main(capsys, "next", "The capital of France is", "--top", "3", *two, "--ensemble", "product")
    assert top1.splitlines()[1:] == top2.splitlines()[1:]  # the same bytes and probabilities
    _, g1, _ = run_main(capsys, "generate", "The capital of France is", "--greedy", "--max-bytes", "12")
    _, g2, _ = run_main(capsys, "generate", "The capital of France is", "--greedy", "--max-bytes", "12", *two)
    assert g1 == g2 and len(g1) >= 12
