"""Byte vocabularies: the exact bytes every token id of a HF tokenizer spells.

A byte-level LM needs ``byte_vocab[t]``, the bytes token ``t`` adds to the
decoded text, for every id, and the tokenizer's own encoding of a byte string
as a path through those bytes. This module provides both:

- :func:`byte_vocab_from_tokenizer` reads a fast (``tokenizers``-backed)
  tokenizer and returns one ``bytes`` per id. The spelling rule is picked from
  the tokenizer's decoder (falling back to its pre-tokenizer and normalizer),
  never from a model name:

  * **byte-level BPE** (GPT-2, SmolLM2, Llama 3, Qwen): a ``ByteLevel``
    decoder. Every character of a token stands for one byte through GPT-2's
    printable byte alphabet, e.g. ``"Ġthe"`` -> ``b" the"``.
  * **SentencePiece style** (Llama 2, Gemma, T5): a ``Metaspace`` decoder or a
    ``Replace("▁" -> " ")`` one. ``"▁the"`` -> ``b" the"``; with byte fallback,
    ``"<0x0A>"`` -> ``b"\\n"``; anything else is UTF-8 text.
  * **added and special tokens**: their content as UTF-8,
    e.g. ``"<|im_start|>"`` -> ``b"<|im_start|>"``.

- :func:`encode_bytes` returns the tokenizer's encoding of a byte string whose
  token bytes concatenate back to exactly that string, or ``None``.

Not handled: WordPiece (``##`` pieces get a space or not depending on their
neighbour, so no token has bytes of its own), BPE with a continuing-subword
prefix or an end-of-word suffix (CLIP's ``</w>``), regex ``Replace`` decoders,
and slow (pure-Python) tokenizers. These raise ``ValueError``. A SentencePiece
vocabulary cannot tell a literal ``"▁"`` in the input from a space, and a
tokenizer with a normalizer (NFC, lowercasing) rewrites some inputs: for such
inputs :func:`encode_bytes` returns ``None`` rather than a wrong encoding.
"""

from __future__ import annotations

import json
import logging
import re
import weakref
from dataclasses import dataclass
from typing import Any, NamedTuple

logger = logging.getLogger(__name__)

__all__ = ["TokenizerDefaults", "byte_level_alphabet", "byte_vocab_from_tokenizer", "encode_bytes",
           "tokenizer_defaults"]

# SentencePiece's byte-fallback pieces: "<0x0A>" is the single byte 0x0A.
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")

# Decoder steps that do not change what a token spells in the middle of a text:
# Fuse joins strings, Strip trims the ends of the whole text (a dummy prefix),
# ByteFallback turns "<0xNN>" pieces into bytes (handled by `_Family.byte_fallback`).
_NEUTRAL_DECODERS = frozenset({"Fuse", "Strip", "ByteFallback"})


def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte alphabet, as ``{character: byte}`` for all 256 bytes.

    Printable Latin-1 bytes stand for themselves; the other 68 (controls, the
    space, DEL, NBSP, soft hyphen) are moved, in order, to ``chr(256)`` onward.

    Example:
        >>> alphabet = byte_level_alphabet()
        >>> alphabet["A"], alphabet["Ġ"], alphabet["Ċ"]  # "Ġ" is the space, "Ċ" the newline
        (65, 32, 10)
    """
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    kept_set = set(kept)
    moved = [b for b in range(256) if b not in kept_set]
    alphabet = {chr(b): b for b in kept}
    alphabet.update({chr(256 + n): b for n, b in enumerate(moved)})
    return alphabet


_BYTE_LEVEL = byte_level_alphabet()


# ----------------------------------------------------------------------------
# Reading the tokenizer
# ----------------------------------------------------------------------------


def _backend(tokenizer: Any):
    """The ``tokenizers.Tokenizer`` behind a transformers tokenizer (or itself)."""
    from tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    for attribute in ("backend_tokenizer", "_tokenizer"):
        backend = getattr(tokenizer, attribute, None)
        if isinstance(backend, Tokenizer):
            return backend
    raise TypeError(
        f"expected a fast transformers tokenizer (one with a `backend_tokenizer`) or a "
        f"tokenizers.Tokenizer, got {type(tokenizer).__name__}; load it with "
        f"AutoTokenizer.from_pretrained(...) (fast tokenizers are the default)"
    )


def _state(component: Any) -> dict | None:
    """A normalizer, pre-tokenizer, decoder or model as its JSON dict (None stays None)."""
    return None if component is None else json.loads(component.__getstate__())


def _steps(component: Any) -> list[dict]:
    """A normalizer, pre-tokenizer or decoder as a flat list of its JSON steps."""
    spec = _state(component)
    return [] if spec is None else _flatten(spec)


def _flatten(spec: dict) -> list[dict]:
    nested = spec.get("decoders") or spec.get("pretokenizers") or spec.get("normalizers")
    if spec.get("type") == "Sequence" and nested is not None:
        return [step for child in nested for step in _flatten(child)]
    return [spec]


@dataclass(frozen=True)
class _Family:
    """How a tokenizer's model-vocabulary tokens spell bytes.

    Attributes:
        name: ``"byte_level"`` or ``"sentencepiece"``.
        replacements: ``(old, new)`` string replacements applied in order to a
            SentencePiece token, e.g. ``(("▁", " "),)``.
        byte_fallback: whether ``<0xNN>`` pieces stand for the byte ``0xNN``.
    """

    name: str
    replacements: tuple[tuple[str, str], ...] = ()
    byte_fallback: bool = False


def _first_token(vocab: dict[str, int], predicate) -> tuple[str, int] | None:
    found = [(i, t) for t, i in vocab.items() if predicate(t)]
    if not found:
        return None
    i, t = min(found)
    return t, i


def _detect_family(backend, vocab: dict[str, int]) -> _Family:
    """Pick the spelling rule from the model, the decoder, then the pre-tokenizer and normalizer.

    Raises:
        ValueError: the tokenizer is of a kind whose tokens have no bytes of
            their own (WordPiece, subword prefixes/suffixes) or is unrecognized.
    """
    model = backend.model
    model_type = type(model).__name__
    decoder = _steps(backend.decoder)
    decoder_types = [step.get("type") for step in decoder]

    if model_type == "WordPiece" or "WordPiece" in decoder_types:
        found = _first_token(vocab, lambda t: t.startswith("##") and len(t) > 2)
        example = f"token {found[0]!r} (id {found[1]})" if found else "a token"
        raise ValueError(
            f"WordPiece tokenizers are not supported: {example} is spelled differently depending on "
            f"the token before it (the decoder adds a space between words), so it has no fixed bytes"
        )
    for attribute in ("continuing_subword_prefix", "end_of_word_suffix"):
        affix = getattr(model, attribute, None)
        if affix:
            found = _first_token(vocab, lambda t, a=affix: a in t)
            example = f"token {found[0]!r} (id {found[1]})" if found else "a token"
            raise ValueError(
                f"BPE with {attribute}={affix!r} is not supported: {example} carries a marker "
                f"whose bytes depend on its neighbours"
            )

    if model_type == "Unigram":  # the Python object does not expose the flag
        model_fallback = bool(_state(model).get("byte_fallback"))
    else:
        model_fallback = bool(getattr(model, "byte_fallback", False))
    byte_fallback = model_fallback or "ByteFallback" in decoder_types

    if "ByteLevel" in decoder_types:
        others = sorted({t for t in decoder_types if t not in _NEUTRAL_DECODERS | {"ByteLevel"}})
        if others:
            raise ValueError(f"a ByteLevel decoder combined with {others} is not supported")
        return _Family("byte_level")

    replacements = []
    for step in decoder:
        kind = step.get("type")
        if kind == "Metaspace":
            replacements.append((step["replacement"], " "))
        elif kind == "Replace":
            pattern = step.get("pattern", {})
            if "String" not in pattern:
                raise ValueError(f"a Replace decoder with a regex pattern ({pattern}) is not supported")
            replacements.append((pattern["String"], step["content"]))
        elif kind not in _NEUTRAL_DECODERS:
            raise ValueError(
                f"cannot tell how tokens are spelled: decoder step {kind!r} is not supported "
                f"(supported: ByteLevel, Metaspace, Replace, ByteFallback, Fuse, Strip)"
            )
    if any(new == " " for _, new in replacements):
        return _Family("sentencepiece", tuple(replacements), byte_fallback)

    # No decoder that says how spaces are written: fall back to the input side.
    if not decoder:
        for step in _steps(backend.pre_tokenizer):
            if step.get("type") == "ByteLevel":
                return _Family("byte_level")
            if step.get("type") == "Metaspace":
                return _Family("sentencepiece", ((step["replacement"], " "),), byte_fallback)
        for step in _steps(backend.normalizer):
            pattern = step.get("pattern", {})
            if step.get("type") == "Replace" and pattern.get("String") == " ":
                return _Family("sentencepiece", ((step["content"], " "),), byte_fallback)
    raise ValueError(
        f"cannot tell how tokens are spelled: a {model_type} model with decoder steps "
        f"{decoder_types or 'none'} is neither byte-level BPE (a ByteLevel decoder) nor "
        f"SentencePiece style (a Metaspace decoder, or Replace('▁' -> ' '))"
    )


def _spell(token: str, token_id: int, family: _Family) -> bytes:
    """The bytes one model-vocabulary token stands for, under ``family``'s rule."""
    if family.name == "byte_level":
        try:
            return bytes(_BYTE_LEVEL[c] for c in token)
        except KeyError as e:
            raise ValueError(
                f"token {token!r} (id {token_id}) has the character {e.args[0]!r} "
                f"(U+{ord(e.args[0]):04X}), which is not in the byte-level alphabet, so its bytes "
                f"are unknown; if it is meant as literal text, make it an added token"
            ) from None
    if family.byte_fallback:
        match = _BYTE_PIECE.fullmatch(token)
        if match:
            return bytes([int(match[1], 16)])
    for old, new in family.replacements:
        token = token.replace(old, new)
    try:
        return token.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate
        raise ValueError(f"token {token!r} (id {token_id}) is not valid Unicode text") from None


def byte_vocab_from_tokenizer(tokenizer: Any) -> list[bytes]:
    """The bytes every token id contributes to decoded text.

    Args:
        tokenizer: a fast transformers tokenizer (``PreTrainedTokenizerFast`` /
            ``TokenizersBackend``) or a ``tokenizers.Tokenizer``.

    Returns:
        ``byte_vocab`` with ``byte_vocab[t]`` the bytes of token ``t``, of
        length ``len(tokenizer)`` (model vocabulary plus added tokens); ids
        that name no token get ``b""``. Added and special tokens map to their
        content, e.g. ``b"<|im_start|>"``. SentencePiece pieces keep their
        space: ``"▁the"`` -> ``b" the"`` (see :func:`encode_bytes` for the
        dummy prefix).

    Raises:
        TypeError: ``tokenizer`` is not a fast tokenizer.
        ValueError: the tokenizer's kind is not supported, or a token cannot
            be mapped to bytes (the message names the token and its id).

    Example:
        >>> byte_vocab = byte_vocab_from_tokenizer(tok)  # doctest: +SKIP
        >>> byte_vocab[tok.convert_tokens_to_ids("Ġthe")]  # doctest: +SKIP
        b' the'
    """
    backend = _backend(tokenizer)
    vocab = backend.get_vocab(with_added_tokens=False)
    added = backend.get_added_tokens_decoder()
    family = _detect_family(backend, vocab)
    logger.debug("tokenizer family %s (%d model tokens, %d added)", family, len(vocab), len(added))

    size = len(tokenizer) if tokenizer is not backend else backend.get_vocab_size(with_added_tokens=True)
    largest = max([*vocab.values(), *added.keys()], default=-1)
    if largest >= size:
        logger.warning("tokenizer reports %d tokens but has id %d; byte_vocab covers all ids", size, largest)
        size = largest + 1

    byte_vocab = [b""] * size
    for token, token_id in vocab.items():
        byte_vocab[token_id] = _spell(token, token_id, family)
    for token_id, token in added.items():
        content = token.content
        if family.byte_fallback and _BYTE_PIECE.fullmatch(content) and vocab.get(content) == token_id:
            continue  # a byte piece also registered as added: its byte, as spelled above
        byte_vocab[token_id] = content.encode("utf-8")
    return byte_vocab


# ----------------------------------------------------------------------------
# Encoding
# ----------------------------------------------------------------------------


def _drop_prefix(node: dict | None) -> tuple[dict | None, bool]:
    """One normalizer or pre-tokenizer JSON node with its dummy prefix switched off.

    Covers a ``Prepend`` normalizer (Llama 2 legacy), a ``Metaspace``
    pre-tokenizer's ``prepend_scheme``/``add_prefix_space`` and a ``ByteLevel``
    pre-tokenizer's ``add_prefix_space``, at any depth of ``Sequence`` nesting.
    Edits in place; returns ``(node or None if it was a Prepend, changed)``.
    """
    if node is None:
        return None, False
    kind = node.get("type")
    if kind == "Prepend":
        return None, True
    if kind == "Sequence":
        key = "normalizers" if "normalizers" in node else "pretokenizers"
        changed = False
        kept = []
        for child in node.get(key, []):
            child, child_changed = _drop_prefix(child)
            changed |= child_changed
            if child is not None:
                kept.append(child)
        node[key] = kept
        return node, changed
    changed = False
    if kind == "Metaspace" and node.get("prepend_scheme", "never") != "never":
        node["prepend_scheme"] = "never"
        changed = True
    if kind in ("Metaspace", "ByteLevel") and node.get("add_prefix_space"):
        node["add_prefix_space"] = False
        changed = True
    return node, changed


def _without_dummy_prefix(spec: dict) -> bool:
    """Switch off every dummy prefix in a tokenizer's JSON (in place); return whether there was one."""
    changed = False
    for part in ("normalizer", "pre_tokenizer"):
        spec[part], part_changed = _drop_prefix(spec.get(part))
        changed |= part_changed
    return changed


def _has_dummy_prefix(backend) -> bool:
    """Whether the tokenizer writes a dummy prefix (without serializing its vocabulary)."""
    parts = {
        "normalizer": _state(backend.normalizer),
        "pre_tokenizer": _state(backend.pre_tokenizer),
    }
    return _without_dummy_prefix(parts)


# backend tokenizer -> its copy without a dummy prefix (None when it has none)
_PREFIX_FREE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _prefix_free_copy(backend):
    """A copy of ``backend`` that adds no dummy prefix, or None if it adds none. Cached."""
    try:
        return _PREFIX_FREE[backend]
    except KeyError:
        pass
    copy = None
    if _has_dummy_prefix(backend):
        from tokenizers import Tokenizer

        spec = json.loads(backend.to_str())
        spec["truncation"] = spec["padding"] = None
        if _without_dummy_prefix(spec):
            copy = Tokenizer.from_str(json.dumps(spec))
            logger.debug("encoding through a copy of the tokenizer without its dummy prefix")
    _PREFIX_FREE[backend] = copy
    return copy


def encode_bytes(tokenizer: Any, byte_vocab: list[bytes], data: bytes) -> list[int] | None:
    """The tokenizer's own encoding of ``data``, as a path through ``byte_vocab``.

    No special tokens are added (special-token text inside ``data`` is matched
    as usual). A tokenizer that writes a dummy prefix space (SentencePiece's
    ``add_dummy_prefix``: ``"hi"`` -> ``"▁hi"``) encodes through a cached copy
    with that prefix switched off, so ``"hi"`` -> ``"hi"`` and ``" hi"`` ->
    ``"▁hi"``. The result is checked before it is returned.

    Args:
        tokenizer: the tokenizer ``byte_vocab`` was built from.
        byte_vocab: ``byte_vocab_from_tokenizer(tokenizer)``.
        data: the bytes to encode.

    Returns:
        ``ids`` with ``b"".join(byte_vocab[t] for t in ids) == data``, or
        ``None`` if ``data`` is not valid UTF-8 or the tokenizer's encoding does
        not spell ``data`` exactly (e.g. a normalizer rewrote it, or it holds a
        literal ``"▁"``).

    Raises:
        TypeError: ``data`` is not bytes, or ``tokenizer`` is not a fast tokenizer.
        ValueError: the tokenizer produced an id outside ``byte_vocab`` (it was
            built from another tokenizer).

    Example:
        >>> encode_bytes(tok, byte_vocab, b"Hello world")  # doctest: +SKIP
        [19556, 905]
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        hint = " (encode a str first: s.encode('utf-8'))" if isinstance(data, str) else ""
        raise TypeError(f"data must be bytes, got {type(data).__name__}{hint}")
    data = bytes(data)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None

    backend = _backend(tokenizer)
    copy = _prefix_free_copy(backend)
    if copy is not None:
        copy.encode_special_tokens = backend.encode_special_tokens
        ids = copy.encode(text, add_special_tokens=False).ids
    elif tokenizer is not backend:
        ids = tokenizer.encode(text, add_special_tokens=False)  # resets any truncation/padding left set
    else:
        ids = backend.encode(text, add_special_tokens=False).ids

    n = len(byte_vocab)
    try:
        spelled = b"".join([byte_vocab[t] for t in ids])
    except IndexError:
        bad = next(t for t in ids if t >= n)
        raise ValueError(
            f"the tokenizer produced id {bad}, but byte_vocab has {n} entries: "
            f"build byte_vocab with byte_vocab_from_tokenizer on this same tokenizer"
        ) from None
    if spelled != data:
        logger.debug("the tokenizer's encoding of %r spells %r; no exact encoding", data[:60], spelled[:60])
        return None
    return ids


# ----------------------------------------------------------------------------
# What every backend takes from its tokenizer
# ----------------------------------------------------------------------------


class TokenizerDefaults(NamedTuple):
    """What a backend hands ``AsyncLM.__init__``: see :func:`tokenizer_defaults`."""

    byte_vocab: list[bytes]
    eos_token_ids: list[int]
    initial_context: list[int]


def tokenizer_defaults(tokenizer: Any, *, generation_eos=None, config_eos=None, n_logits: int | None = None,
                       byte_vocab=None, eos_token_ids=None, initial_context=None) -> TokenizerDefaults:
    """The byte vocabulary, EOS ids and initial context of a model served by any backend.

    Each of ``byte_vocab``, ``eos_token_ids`` and ``initial_context`` given (not None) is kept;
    the others come from the tokenizer:

    - ``byte_vocab``: :func:`byte_vocab_from_tokenizer`, padded with ``b""`` to ``n_logits``
      entries when the model's output layer is larger than the tokenizer (ids no text spells);
    - ``eos_token_ids``: the tokenizer's ``eos_token_id``, then the generation config's and the
      model config's ``eos_token_id`` (``generation_eos``, ``config_eos``: an id, a list of ids
      or None), in that order, without repeats;
    - ``initial_context``: ``[bos_token_id]``, else the first EOS id, else ``[]``.

    Args:
        tokenizer: a fast transformers tokenizer.
        generation_eos, config_eos: ``eos_token_id`` of the model's generation config and config.
        n_logits: the length of the model's log-prob vectors (None: the byte vocabulary's).

    Raises:
        ValueError: the tokenizer has more tokens than the model has logits.

    Example:
        >>> d = tokenizer_defaults(tok, config_eos=0, n_logits=49152)  # doctest: +SKIP
        >>> len(d.byte_vocab), d.eos_token_ids, d.initial_context  # doctest: +SKIP
        (49152, [2, 0], [1])
    """
    if byte_vocab is None:
        byte_vocab = byte_vocab_from_tokenizer(tokenizer)
    if eos_token_ids is None:
        eos_token_ids = []
        for source in (getattr(tokenizer, "eos_token_id", None), generation_eos, config_eos):
            for t in source if isinstance(source, (list, tuple)) else [source]:
                if t is not None and int(t) not in eos_token_ids:
                    eos_token_ids.append(int(t))
    if initial_context is None:
        bos = getattr(tokenizer, "bos_token_id", None)
        initial_context = [bos] if bos is not None else list(eos_token_ids[:1])
    if n_logits is not None:
        if len(byte_vocab) < n_logits:  # the output layer is padded beyond the tokenizer
            byte_vocab = list(byte_vocab) + [b""] * (n_logits - len(byte_vocab))
        elif len(byte_vocab) > n_logits:
            raise ValueError(f"the tokenizer has {len(byte_vocab)} tokens but the model outputs {n_logits} logits")
    return TokenizerDefaults(list(byte_vocab), list(eos_token_ids), list(initial_context))
