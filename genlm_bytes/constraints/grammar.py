"""Constraints compiled by llguidance: JsonSchema, Grammar (Lark), and the base of Regex.

A :class:`GrammarConstraint` is exact: after every text it allows exactly the
bytes that continue some accepted text, and EOS exactly where the text is
accepted. So it never leads a sampler to a dead end (unless its language is
empty: then it allows nothing from the start).

Its :class:`GrammarCursor` holds an llguidance matcher at its text. Stepping
a cursor hands that matcher to the child (no copy) when the child is the
first one; a second child of the same cursor (SMC particles that part ways)
gets a copy of the parent's parse, recovered from the first child by a
one-byte rollback, or by replaying the text when that child has moved on.

Example:
    >>> person = JsonSchema({"type": "object", "properties": {"age": {"type": "integer"}},
    ...                      "required": ["age"]})
    >>> person.accepts(b'{"age": 7}'), person.accepts(b'{"age": "7"}'), person.allows(b'{"age": 7', ord("}"))
    (True, False, True)

Not handled: JSON Schema keywords llguidance does not implement (an error at
construction); properties in another order than the schema's.
"""

from __future__ import annotations

import json
import numbers
import weakref
from collections import OrderedDict

import numpy as np

from genlm_bytes.constraints.base import AllOfCursor, Constraint, Cursor, check_bytes
from genlm_bytes.constraints.engine import (
    byte_tokenizer,
    compile_grammar,
    llguidance_module,
    matcher_mask,
    new_matcher,
)
from genlm_bytes.constraints.whitespace import (
    WhitespaceRunCursor,
    whitespace_pattern_honoured,
)
from genlm_bytes.symbols import N_BYTES

#: Default bound on whitespace between JSON tokens: one line break, then at most this many spaces
#: or tabs. 40 lets ``indent=2`` documents nest 20 levels deep (``indent=4``: 10).
DEFAULT_MAX_WHITESPACE = 40


class GrammarCursor(Cursor):
    """A cursor that owns an llguidance matcher positioned after :attr:`text` (None: nothing allowed)."""

    __slots__ = ("__weakref__", "_first_child", "_mask", "_matcher", "_source", "constraint", "text")

    def __init__(self, constraint: GrammarConstraint, text: bytes, matcher):
        self.constraint = constraint
        self.text = text
        self._matcher = matcher  # handed to the first child by `advance`
        self._mask: np.ndarray | None = None
        self._first_child = None  # weakref to the child that took the matcher
        self._source = None  # this cursor's parse, rebuilt for later children

    def mask(self) -> np.ndarray:
        if self._mask is None:
            self._mask = matcher_mask(self._matcher)
        return self._mask

    def advance(self, byte: int) -> GrammarCursor:
        text = self.text + bytes([byte])
        if not (0 <= byte < N_BYTES and self.mask()[byte]):
            return GrammarCursor(self.constraint, text, None)
        matcher = self._matcher_for_child()
        matcher.consume_token(byte)
        child = GrammarCursor(self.constraint, text, matcher)
        if self._first_child is None:
            self._first_child = weakref.ref(child)
        return child

    def _matcher_for_child(self):
        """A matcher at :attr:`text` that the caller may consume into."""
        if self._matcher is not None:  # the first child takes this cursor's matcher
            matcher, self._matcher = self._matcher, None
            return matcher
        if self._source is None:
            first = self._first_child() if self._first_child is not None else None
            if first is not None and first._matcher is not None:  # one byte ahead: step back
                self._source = first._matcher.deep_copy()
                self._source.rollback(1)
            else:
                self._source = self.constraint.replay(self.text)
        return self._source.deep_copy()


class GrammarConstraint(Constraint):
    """A constraint given by an llguidance grammar string (see :class:`Regex`, :class:`JsonSchema`,
    :class:`Grammar`).

    Args:
        grammar: an llguidance grammar (e.g. from ``LLMatcher.grammar_from_lark``).
        what: what to call a bad grammar in the ``ValueError``, e.g. ``"invalid Lark grammar"``.

    Raises:
        ValueError: llguidance rejects the grammar (its message follows ``what``).
    """

    #: How many cursors :meth:`cursor` keeps by text (so ``mask(prefix)`` byte after byte is incremental).
    cursor_cache_size = 256

    def __init__(self, grammar: str, what: str):
        super().__init__()
        self.grammar = compile_grammar(grammar, what)
        self._cursors: OrderedDict[bytes, GrammarCursor] = OrderedDict()

    def replay(self, text: bytes):
        """A new matcher after consuming ``text``, or None when ``text`` is forbidden."""
        matcher = new_matcher(self.grammar)
        if text and not matcher.consume_tokens(list(text)):
            return None
        return matcher

    def cursor(self, text: bytes = b"") -> GrammarCursor:
        text = check_bytes(text, "text")
        c = self._cursors.get(text)
        if c is None:
            parent = self._cursors.get(text[:-1]) if text else None
            c = parent.advance(text[-1]) if parent is not None else GrammarCursor(self, text, self.replay(text))
            self._cursors[text] = c
            if len(self._cursors) > self.cursor_cache_size:
                self._cursors.popitem(last=False)
        else:
            self._cursors.move_to_end(text)
        return c

    def _mask(self, prefix: bytes) -> np.ndarray:
        return self.cursor(prefix).mask()


_UNICODE_ESCAPES = "json_allow_general_unicode_escapes"


def _json_grammar(schema, options: dict) -> str:
    """llguidance's grammar for ``schema``; without ``\\uXXXX`` escapes of printable characters on
    llguidance versions that lack the option (1.7, the one vLLM 0.32 pins)."""
    llg = llguidance_module()
    try:
        grammar = llg.LLMatcher.grammar_from_json_schema(schema, overrides=options)
    except ValueError as e:
        raise ValueError(f"invalid JSON schema: {e}") from None
    if _UNICODE_ESCAPES in options and _UNICODE_ESCAPES in llg.LLMatcher.validate_grammar(grammar, byte_tokenizer()):
        return _json_grammar(schema, {k: v for k, v in options.items() if k != _UNICODE_ESCAPES})
    return grammar


class JsonSchema(GrammarConstraint):
    """Any JSON text whose value validates against a JSON Schema.

    Args:
        schema: the schema, as a dict (or ``True``/``False``) or a JSON string.
        max_whitespace: whitespace between JSON tokens: an int ``n`` allows one optional line
            break followed by at most ``n`` spaces or tabs (default
            :data:`DEFAULT_MAX_WHITESPACE`, enough for indented documents, so a run of
            whitespace cannot go on forever); 0 allows none (compact JSON); None allows any
            amount. No whitespace before the value or after it.

    Properties must come in the schema's order; properties the schema does not list are
    allowed unless ``"additionalProperties": false``. Strings may hold ``\\uXXXX`` escapes of
    any character (``json.dumps``'s default for non-ASCII) from llguidance 1.9 on; 1.7 (the
    version vLLM 0.32 pins) allows them for control characters only (there the whitespace bound
    is kept beside llguidance, by :mod:`genlm_bytes.constraints.whitespace`).

    Raises:
        ValueError: the schema is not JSON, or llguidance rejects it (unknown type or format,
            an unsupported keyword, a dangling ``$ref``: its message says which).
    """

    def __init__(self, schema: dict | bool | str, *, max_whitespace: int | None = DEFAULT_MAX_WHITESPACE):
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ValueError(f"invalid JSON schema: not valid JSON ({e})") from None
        if not isinstance(schema, (dict, bool)):
            raise TypeError(f"schema must be a dict (or a JSON string of one), got {type(schema).__name__}")
        if max_whitespace is not None and (isinstance(max_whitespace, bool) or
                                           not isinstance(max_whitespace, numbers.Integral) or max_whitespace < 0):
            raise ValueError(f"max_whitespace must be an int >= 0 or None (unbounded), got {max_whitespace!r}")
        self.schema = schema
        self.max_whitespace = max_whitespace
        options = {_UNICODE_ESCAPES: True}  # "\u00e9", as json.dumps writes by default
        if max_whitespace == 0:
            options["whitespace_flexible"] = False
        elif max_whitespace is not None:
            options["whitespace_pattern"] = rf"(\r?\n)?[\x20\x09]{{0,{int(max_whitespace)}}}"
        super().__init__(_json_grammar(schema, options), "invalid JSON schema")
        # llguidance 1.7 ignores whitespace_pattern: bound the runs beside the grammar instead.
        self._run_limit = None if max_whitespace in (0, None) or whitespace_pattern_honoured() else max_whitespace

    def cursor(self, text: bytes = b"") -> Cursor:
        c = super().cursor(text)
        if self._run_limit is None:
            return c
        return AllOfCursor((c, WhitespaceRunCursor.at(self._run_limit, c.text)), c.text)

    def __repr__(self) -> str:
        text = json.dumps(self.schema, separators=(",", ":"))
        return f"JsonSchema({text if len(text) <= 60 else text[:57] + '...'})"


class Grammar(GrammarConstraint):
    """Texts of a context-free grammar in Lark syntax, as llguidance reads it.

    The grammar starts at rule ``start``. Terminals (upper-case names, ``"literals"``,
    ``/regexes/``) match greedily: ``start: WORD "s"`` with ``WORD: /[a-z]+/`` never completes;
    rules over single-character terminals are exact. No whitespace is ignored unless the
    grammar says ``%ignore``.

    Example:
        >>> arith = Grammar('start: expr\\nexpr: NUM | expr "+" expr\\nNUM: /[0-9]+/')
        >>> arith.accepts(b"1+23"), arith.accepts(b"1+")
        (True, False)

    Raises:
        ValueError: llguidance rejects the grammar (its message says where).
    """

    def __init__(self, lark_source: str):
        if not isinstance(lark_source, str):
            raise TypeError(f"lark_source must be a str holding a Lark grammar, got {type(lark_source).__name__}")
        self.source = lark_source
        grammar = llguidance_module().LLMatcher.grammar_from_lark(lark_source)
        super().__init__(grammar, "invalid Lark grammar")

    def __repr__(self) -> str:
        first = self.source.strip().splitlines()[0] if self.source.strip() else ""
        return f"Grammar({first[:50]!r}{'...' if len(self.source.strip()) > len(first[:50]) else ''})"
