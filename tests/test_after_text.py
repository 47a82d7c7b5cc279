"""The guesses after a known text (genlm_bytes.byte_lm.after_text): the greedy byte walk over the
distributions of the text's two kinds of covers, and which contexts a prefill computes for a
generation from the text's end."""

import math

import numpy as np
import pytest
import torch

from genlm_bytes import TokenByteTrie
from genlm_bytes.byte_lm.after_text import guesses_after, walk
from genlm_bytes.byte_lm.trie_state import TrieSpace

VOCAB = [b"a", b"ab", b"abc", b"b", b"x", b"xy", b"<eos>"]
A, AB, ABC, B, X, XY, EOS_ID = range(7)
THR = math.log(0.05)


def logp(**named) -> torch.Tensor:
    """Log-probabilities of the tokens of VOCAB (``eos=`` for "<eos>"), -inf for the others."""
    p = np.zeros(len(VOCAB))
    for name, v in named.items():
        p[VOCAB.index(b"<eos>" if name == "eos" else name.encode())] = v
    with np.errstate(divide="ignore"):
        return torch.tensor(np.log(p), dtype=torch.float32)


@pytest.fixture
def space():
    return TrieSpace(TokenByteTrie(VOCAB, eos_tokens=[b"<eos>"]), eos_ids=[EOS_ID])


def start(space, i: int, prefix: bytes, **named):
    """A walk's start: the cover of context ``i`` at the trie node of ``prefix``."""
    return (i, space.trie.walk(prefix), space.dist_for(logp(**named)), 1.0)


def test_the_walk_takes_the_heaviest_byte_and_lists_the_endings_a_beam_keeps_on_its_way(space):
    s = start(space, 5, b"", a=0.1, ab=0.05, abc=0.3, x=0.2, xy=0.1, eos=0.25)
    # "a..." holds 0.45 against "x..." 0.3 (EOS is no byte); at "a" the token "a" (0.1) holds
    # less than "ab..." (0.35): on; "ab" (0.05) likewise against "abc" (0.3); it stops at "abc".
    assert walk(space, [s], THR) == [(5, A), (5, AB), (5, ABC)]
    # A stricter beam keeps neither ending on the way (0.1 < 0.5 * 0.45, 0.05 < 0.5 * 0.35).
    assert walk(space, [s], math.log(0.5)) == [(5, ABC)]
    # A token that holds as much as the bytes after it ends the walk there.
    assert walk(space, [start(space, 5, b"", a=0.4, ab=0.3, x=0.2)], THR) == [(5, A)]


def test_the_walk_counts_a_cover_inside_a_longer_token_on_the_same_scale(space):
    """A second start: the text's last token was "a", and a cover is still inside "ab...". Its
    next byte "b" (0.6) outweighs the first start's "x..." (0.4), so the walk goes on with "b"
    from both starts, and stops where "ab" ends; the token "b" ending there too is kept."""
    # (after "a": 0.06 for "ab" and 0.1 for "a" itself; divided by p("a"), one scale with the first)
    i, node, d, _ = start(space, 4, b"a", a=0.1, ab=0.06)
    starts = [start(space, 5, b"", x=0.3, b=0.05, xy=0.1), (i, node, d, 10.0)]
    assert walk(space, starts, THR) == [(5, B), (4, AB)]
    assert walk(space, starts, math.log(0.2)) == [(4, AB)]  # (0.05 < 0.2 * 0.65)


class _LM:
    """What guesses_after reads of a model: cached distributions after a few contexts."""

    byte_vocab = VOCAB

    def __init__(self, dists: dict):
        self.dists, self.cached = dists, set(dists)

    async def peek_next_token_logprobs(self, ids):
        return self.dists[tuple(ids)]

    def has_logprobs(self, ids) -> bool:
        return tuple(ids) in self.cached


async def test_a_longer_token_after_all_but_the_text_s_last_one_is_guessed_before_the_likeliest_after_it(space):
    full = (X, A)  # the text's encoding ends with the token "a"
    lm = _LM({full: logp(x=0.3, b=0.1, xy=0.1, eos=0.5), (X,): logp(a=0.1, ab=0.3, abc=0.2, xy=0.4)})
    # Inside "ab..." after "x": 0.5 / 0.1 = 5 on the scale of the tokens after "x a", against 0.4
    # for "x..." after the text: the walk stops at "ab" (3 against "abc"'s 2), then the likeliest
    # token after the text ("x"; EOS, likelier, is never guessed: a generation writes no EOS bytes).
    assert await guesses_after(lm, space, full, 2, THR) == [(1, AB), (2, X)]
    assert await guesses_after(lm, space, full, 1, THR) == [(1, AB)]
    lm.cached.add(full + (X,))  # (what is cached already is not guessed again)
    assert await guesses_after(lm, space, full, 2, THR) == [(1, AB)]
    assert await guesses_after(lm, space, full, 0, THR) == []


@pytest.mark.parametrize("k, expected", [(1, [(1, X)]), (2, [(1, X), (1, XY)]), (3, [(1, X), (1, XY), (1, B)])])
async def test_after_a_text_of_one_token_the_guesses_are_tokens_after_it(space, k, expected):
    lm = _LM({(A,): logp(b=0.2, x=0.5, xy=0.3)})
    # "x..." (0.8) outweighs "b" (0.2); "x" (0.5) holds more than "xy" (0.3): the walk stops at
    # "x"; then the likeliest tokens, "k" guesses in all.
    assert await guesses_after(lm, space, (A,), k, THR) == expected
