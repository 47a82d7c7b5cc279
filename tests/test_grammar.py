"""Constraints on llguidance (Regex, JsonSchema, Grammar): exactness against oracles, cursors, bad input."""

import json
import math
import random
import sys

import jsonschema
import numpy as np
import pytest
import regex

from genlm_bytes import EOS, BeamParams, ByteBeamState, MockLM
from genlm_bytes.constraints import (
    AllOf,
    ConstrainedState,
    Grammar,
    JsonSchema,
    Predicate,
    Regex,
    StringSet,
)
from genlm_bytes.smc import smc


def allowed(mask) -> set:
    return {int(i) for i in np.nonzero(mask)[0]}


# --------------------------------------------------------------------------- Regex: exact by enumeration

# Every character these patterns can match is in ALPHABET (checked by reading them), so the
# enumeration below finds their whole (finite) languages.
ALPHABET = ("abx" + "".join(map(chr, range(0xC0, 0x100))) + "ÇçÉé" + "αβγδΑΒΓϐ€£" + "日本語中" + "😀😂😃")
FINITE = [r"[é-ü]{1,2}", r"(ab|ç|日本)x?", r"\u00e9|\N{GREEK SMALL LETTER ALPHA}", r"(?i)é[α-γ]?",
          r"(😀|😂)a?|€{1,2}"]


def language(pattern: str, max_chars: int = 3) -> set[bytes]:
    """Every string over ALPHABET of at most ``max_chars`` characters that fully matches, by a
    depth-first search that the `regex` package's partial matching prunes (an independent engine)."""
    rx = regex.compile(pattern.replace(r"\N{GREEK SMALL LETTER ALPHA}", "α"))
    out, todo = set(), [""]
    while todo:
        s = todo.pop()
        if rx.fullmatch(s):
            out.add(s.encode())
        if len(s) < max_chars:
            todo.extend(s + c for c in ALPHABET if rx.fullmatch(s + c, partial=True))
    return out


@pytest.mark.parametrize("pattern", FINITE)
def test_regex_mask_is_exact_on_finite_languages(pattern):
    lang = language(pattern)
    assert lang and max(map(len, lang)) >= 2  # non-ASCII: multi-byte characters
    c = Regex(pattern)
    prefixes = {w[:i] for w in lang for i in range(len(w) + 1)}
    for p in sorted(prefixes):
        m = c.mask(p)
        expected = {w[len(p)] for w in lang if w.startswith(p) and len(w) > len(p)}
        assert allowed(m[:256]) == expected, (pattern, p)
        assert bool(m[EOS]) == (p in lang), (pattern, p)
        off = sorted(set(range(256)) - expected)
        for b in (off[0], off[-1]):  # one byte off the language: nothing more is allowed
            assert not c.mask(p + bytes([b])).any(), (pattern, p, b)


def test_regex_refuses_what_is_not_regular_or_not_valid():
    for bad, why in [("(?!)", "look-around"), ("(a)b\\1", "backreferences"), ("[a-", "unclosed character class"),
                     ("a{2,1}", "repetition"), (r"\N{NO SUCH CHARACTER}", "unknown character name")]:
        with pytest.raises(ValueError, match=f"invalid regular expression .*{why}"):
            Regex(bad)
    with pytest.raises(ValueError, match="no equivalent"):
        Regex("a", flags=regex.ASCII)
    assert Regex(regex.compile("ab", regex.IGNORECASE)).accepts(b"aB")


def test_regex_empty_language_allows_nothing():
    c = Regex("ab[a&&b]|[x&&y]")
    assert not c.mask(b"").any() and not c.accepts(b"ab")


# --------------------------------------------------------------------------- cursors


def test_cursor_children_match_fresh_masks_in_any_order():
    c = Regex("(ab|ac|b)[0-9]{0,3}")
    root = c.cursor()
    a = root.advance(ord("a"))  # takes the root's matcher
    b = root.advance(ord("b"))  # a sibling: the root's parse comes back by rollback
    ab = a.advance(ord("b"))
    ac = a.advance(ord("c"))  # `a` gave its matcher to `ab`, which still holds it
    ab1 = ab.advance(ord("1"))
    ab12 = ab1.advance(ord("2"))
    ab2 = ab.advance(ord("2"))  # `ab1` moved on: replayed from the text
    x = root.advance(ord("x"))  # forbidden: a dead cursor
    fresh = Regex("(ab|ac|b)[0-9]{0,3}")
    for cur in (root, a, b, ab, ac, ab1, ab12, ab2, x):
        assert (cur.mask() == fresh.mask(cur.text)).all(), cur.text
    assert not x.mask().any() and not x.advance(ord("1")).mask().any()
    assert allowed(root.mask()) == {ord("a"), ord("b")}


def test_cursor_of_allof_and_prefix_constraints():
    both = Regex("[a-c]+") & Predicate(lambda t: len(t) <= 2)
    cur = both.cursor(b"ab")
    assert allowed(cur.mask()) == {EOS} and cur.text == b"ab"
    assert isinstance(both, AllOf) and allowed(both.mask(b"a")) == set(b"abc") | {EOS}
    s = StringSet(["né", "no"]).cursor().advance(ord("n"))
    assert allowed(s.mask()) == {ord("o"), 0xC3}


# --------------------------------------------------------------------------- JsonSchema

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}},
        "address": {"type": "object", "properties": {"city": {"type": "string"},
                                                     "geo": {"type": "array", "items": {"type": "number"}}}},
    },
    "required": ["name", "age"],
}
GOOD = {"name": "Ada \u00e9 \"x\"", "age": 36, "tags": ["a", "c"],
        "address": {"city": "Zürich", "geo": [47.37, 8.54]}}


def passes_byte_by_byte(c, doc: bytes) -> bool:
    """Every byte allowed after the bytes before it, EOS only at the end."""
    cur = c.cursor()
    for b in doc:
        m = cur.mask()
        if not m[b] or m[EOS]:  # (no proper prefix of these documents is a document)
            return False
        cur = cur.advance(b)
    return bool(cur.mask()[EOS])


@pytest.mark.parametrize("dump", [{"separators": (",", ":")}, {}, {"indent": 2}, {"indent": 4},
                                  {"indent": 2, "ensure_ascii": False}])
def test_json_schema_accepts_valid_documents_in_every_layout(dump):
    c = JsonSchema(PERSON)
    doc = json.dumps(GOOD, **dump).encode()
    assert passes_byte_by_byte(c, doc) and c.accepts(doc)
    assert JsonSchema(json.dumps(PERSON)).accepts(doc)  # the schema as a JSON string


def test_json_schema_refuses_invalid_documents():
    c = JsonSchema(PERSON)
    for bad in [{"name": "x", "age": "36"}, {"name": "x"}, {"name": "x", "age": 1, "tags": ["d"]},
                {"name": "x", "age": -1}, {"name": 3, "age": 1}, [1]]:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, PERSON)
        assert not c.accepts(json.dumps(bad).encode()), bad
    doc = json.dumps(GOOD).encode()
    for garbage in (b" ", b"x", b"}", b"\n{}"):
        assert not c.accepts(doc + garbage)
    assert not c.accepts(b" " + doc) and not c.accepts(doc[:-1])


@pytest.mark.parametrize("llguidance_bounds_it", [True, False])
def test_json_schema_whitespace_is_bounded_and_configurable(llguidance_bounds_it, monkeypatch):
    import genlm_bytes.constraints.grammar as grammar_module

    if not llguidance_bounds_it:  # as on llguidance 1.7: the bound is kept beside the grammar
        monkeypatch.setattr(grammar_module, "whitespace_pattern_honoured", lambda: False)
    from genlm_bytes.constraints.base import AllOfCursor

    assert isinstance(JsonSchema({"type": "object"}).cursor(), AllOfCursor) != llguidance_bounds_it
    deep = {"a": {"a": {"a": {"a": {"a": {"a": {"a": {"a": [1]}}}}}}}}
    any_obj = {"type": "object"}
    assert JsonSchema(any_obj).accepts(json.dumps(deep, indent=2).encode())  # 8 levels deep
    long_run = b'{"a":' + b" " * 41 + b"1}"
    assert not JsonSchema(any_obj).accepts(long_run)
    assert not JsonSchema(any_obj).accepts(b'{"a":\n\n1}')  # one line break at a time
    assert not JsonSchema(any_obj).accepts(b'{"a":  \n1}')  # the line break comes first
    assert JsonSchema(any_obj).accepts(b'{"a":\r\n' + b" " * 40 + b'"  \\"' + b" " * 50 + b'"}')  # in strings: any
    assert JsonSchema(any_obj, max_whitespace=None).accepts(long_run + b"")
    assert JsonSchema(any_obj, max_whitespace=60).accepts(long_run)
    compact = JsonSchema(any_obj, max_whitespace=0)
    assert compact.accepts(b'{"a":1}') and not compact.accepts(b'{"a": 1}')
    with pytest.raises(ValueError, match="max_whitespace"):
        JsonSchema(any_obj, max_whitespace=-1)


def test_json_random_walks_end_only_on_valid_documents():
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 22, "x"]},
                                               "v": {"type": "integer", "minimum": -5, "maximum": 5}},
              "required": ["ok"], "additionalProperties": False}
    c = JsonSchema(schema, max_whitespace=1)
    rnd, ended = random.Random(0), 0
    for _ in range(60):
        cur = c.cursor()
        for _ in range(80):
            m = cur.mask()
            assert m.any(), cur.text  # exact: never a dead end
            if m[EOS]:
                jsonschema.validate(json.loads(cur.text), schema)  # EOS only on valid documents
                if rnd.random() < 0.5 or not m[:256].any():
                    ended += 1
                    break
            cur = cur.advance(rnd.choice(sorted(allowed(m[:256]))))
    assert ended >= 30


def test_json_schema_bad_input_names_the_problem():
    for bad, msg in [({"type": "strin"}, "Invalid type: strin"), ({"type": "string", "format": "nope"},
                     "Unknown format"), ('{"type": ', "not valid JSON"), ({"minimum": "x"}, "minimum"),
                     ({"properties": {"a": {"$ref": "#/defs/x"}}}, "/defs/x")]:
        with pytest.raises(ValueError, match="invalid JSON schema") as e:
            JsonSchema(bad)
        assert msg in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(TypeError, match="schema must be a dict"):
        JsonSchema([{"type": "string"}])


# --------------------------------------------------------------------------- Grammar

ARITH = r"""
start: expr
expr: term (("+" | "-") term)*
term: factor (("*" | "/") factor)*
factor: NUMBER | "(" expr ")"
NUMBER: /[0-9]+/
"""


def test_arithmetic_grammar_accepts_and_refuses():
    g = Grammar(ARITH)
    for ok in [b"1", b"1+2", b"(1+2)*3", b"12*(3-4)/5", b"((7))"]:
        assert g.accepts(ok), ok
    for bad in [b"", b"1+", b"(1", b"1+*2", b"a", b"1 + 2", b"()", b"1)", b"1+2)"]:
        assert not g.accepts(bad), bad
    assert allowed(g.mask(b"(1+2")) == set(b"0123456789+-*/)")
    assert allowed(g.mask(b"(1+2)")) == set(b"+-*/") | {EOS}


def test_grammar_bad_input():
    for bad, msg in [("start: foo", 'unknown name: "foo"'), ("start: /[a-/", "unclosed character class"),
                     ("garbage ::= x", "Expected")]:
        with pytest.raises(ValueError, match="invalid Lark grammar") as e:
            Grammar(bad)
        assert msg in str(e.value)
    with pytest.raises(TypeError, match="Lark grammar"):
        Grammar(b"start: a")


def test_import_stays_light():
    import subprocess

    code = ("import sys, genlm_bytes, genlm_bytes.constraints; "
            "assert 'llguidance' not in sys.modules; genlm_bytes.Regex('a'); assert 'llguidance' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --------------------------------------------------------------------------- sampling on the mock

TINY_SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2]}},
               "required": ["ok"], "additionalProperties": False}


async def mock_beam():
    return await ByteBeamState.initial(MockLM(seed=1), BeamParams(K=4, prune_threshold=0.01, eos_tokens=(b"<eos>",)))


async def test_constrained_sampling_with_json_schema_on_the_mock():
    beam = await mock_beam()
    cs = ConstrainedState(beam, JsonSchema(TINY_SCHEMA, max_whitespace=0))
    for seed in range(3):
        state, out = await cs.generate(40, rng=seed)
        assert state.ended, out
        jsonschema.validate(json.loads(out), TINY_SCHEMA)


async def test_smc_with_json_schema_every_particle_validates():
    beam = await mock_beam()
    r = await smc(beam, JsonSchema(TINY_SCHEMA, max_whitespace=0), 16, 40, rng=0)
    assert math.isfinite(r.log_ml)
    for p in r.particles:
        assert p.finished, p.text
        jsonschema.validate(json.loads(p.text), TINY_SCHEMA)
