"""The command line's constraint and chat flags: --json-schema, --grammar, --regex, --smc, --chat, --system."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

import genlm_bytes.cli.main as cli
import genlm_bytes.cli.session as cli_session
from genlm_bytes.constraints import Grammar

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8"}
SUM = 'start: NUM "+" NUM\nNUM: /[0-9]{1,2}/\n'
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(["generate", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def files(tmp_path):
    (tmp_path / "sum.lark").write_text(SUM)
    (tmp_path / "bad.lark").write_text("start: foo\n")
    (tmp_path / "person.json").write_text(json.dumps(PERSON))
    (tmp_path / "latin1.lark").write_bytes(b"start: \"\xe9\"\n")
    return tmp_path


@pytest.mark.parametrize("argv, expected", [
    (["--chat", "Hi", "--json-schema", '{"type": "strin"}'], "--json-schema: invalid JSON schema: Invalid type: strin"),
    (["--chat", "Hi", "--json-schema", '{"type": '], "--json-schema: invalid JSON schema: not valid JSON"),
    (["--chat", "Hi", "--json-schema", "missing.json"], "is neither a file nor JSON text"),
    (["--chat", "Hi", "--grammar", "{dir}/bad.lark"], '--grammar: invalid Lark grammar: at 1(8): unknown name: "foo"'),
    (["--chat", "Hi", "--grammar", "{dir}/latin1.lark"], "is not UTF-8 text"),
    (["--chat", "Hi", "--grammar", "{dir}/none.lark"], "cannot read"),
    (["x", "--regex", "a(?=b)"], "--regex: invalid regular expression 'a(?=b)': look-around"),
    (["x", "--regex", "a", "--grammar", "{dir}/sum.lark"], "--regex and --grammar cannot be combined"),
    (["x", "--smc", "2"], "--smc needs --regex, --json-schema or --grammar"),
    (["x", "--system", "Be brief."], "--system needs --chat"),
    ([], "give TEXT (a prompt to continue) or --chat MESSAGE"),
    (["x", "--chat", "Hi"], "give TEXT or --chat MESSAGE, not both"),
])
def test_bad_constraints_and_chats_are_one_line_and_exit_2_before_loading(capsys, monkeypatch, files, argv,
                                                                          expected):
    def fail(args):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(cli_session, "load_lm", fail)
    code, out, err = run_main(capsys, *[a.replace("{dir}", str(files)) for a in argv])
    assert code == 2 and out == "", err
    assert err.count("\n") == 1 and err.startswith("genlm-bytes: error:") and expected in err, err


@pytest.fixture
def cli_lm(monkeypatch, embedded_lm):
    monkeypatch.setattr(cli_session, "load_lm", lambda args, model=None: embedded_lm)
    return embedded_lm


@pytest.mark.slow
def test_chat_json_schema_and_grammar_with_and_without_smc(capsys, cli_lm, files):
    # One run as a user makes it (its own process and model) while the others run in-process.
    proc = subprocess.Popen([sys.executable, "-m", "genlm_bytes", "generate", "--chat",
                             "What is the capital of France? Answer with one word.", "--greedy",
                             "--max-bytes", "40"], cwd=REPO, env=ENV, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    code, out, err = run_main(capsys, "--chat", "Invent a person. Reply in JSON with name and age.",
                              "--json-schema", str(files / "person.json"), "--greedy", "--max-bytes", "80")
    assert code == 0 and "stopped by EOS" in err, err
    jsonschema.validate(json.loads(out), PERSON)
    code, out, err = run_main(capsys, "--chat", "Is the sky blue?", "--system", "Answer in JSON.",
                              "--json-schema", '{"enum": ["yes", "no"]}', "--smc", "2", "--seed", "0",
                              "--max-bytes", "8")
    assert code == 0 and out in ('"yes"', '"no"') and "2 particles" in err, (out, err)
    code, out, err = run_main(capsys, "--chat", "Write a sum of two small numbers.", "--grammar",
                              str(files / "sum.lark"), "--seed", "1", "--max-bytes", "12")
    assert code == 0 and Grammar(SUM).accepts(out.encode()) and "stopped by EOS" in err, (out, err)
    out, err = (s.decode("utf-8", "backslashreplace") for s in proc.communicate(timeout=240))
    assert proc.returncode == 0 and "Paris" in out and "<|im" not in out and "stopped by EOS" in err, (out, err)
