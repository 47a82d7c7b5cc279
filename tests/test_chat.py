"""Chat prompts (ByteBeamState.initial(chat=...)) and JSON replies on the embedded model."""

import json
import math

import jsonschema
import numpy as np
import pytest

from genlm_bytes import EOS, BeamParams, ByteBeamState, MockLM
from genlm_bytes.constraints import ConstrainedState, JsonSchema, StringSet
from genlm_bytes.lm.chat import chat_prompt, end_of_turn_ids
from genlm_bytes.lm.mock import default_mock_vocab
from genlm_bytes.smc import smc

SPECIALS = ["<|im_start|>", "<|im_end|>"]


class ChatMLTokenizer:
    """A stand-in HF tokenizer: ChatML template, specials as single ids, other bytes one id each."""

    def __init__(self, first_special: int, chat_template="chatml", end="<|im_end|>\n"):
        self.ids = {s: first_special + i for i, s in enumerate(SPECIALS)}
        self.all_special_ids = list(self.ids.values())
        self.chat_template = chat_template
        self.end = end

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=False):
        assert tokenize is False
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}{self.end}" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")

    def __call__(self, text, add_special_tokens=True):
        assert add_special_tokens is False
        ids, i = [], 0
        while i < len(text):
            special = next((s for s in SPECIALS if text.startswith(s, i)), None)
            if special:
                ids.append(self.ids[special])
                i += len(special)
            else:
                ids.extend(1 + b for b in text[i].encode())  # MockLM's vocabulary: byte b is id 1 + b
                i += 1
        return {"input_ids": ids}


class ChatMockLM(MockLM):
    def __init__(self, **tokenizer_kwargs):
        vocab = default_mock_vocab() + [s.encode() for s in SPECIALS]
        super().__init__(vocab, seed=2, eos_token_ids=[0])
        self.tokenizer = ChatMLTokenizer(len(vocab) - len(SPECIALS), **tokenizer_kwargs)


HELLO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Yes or no?"}]


async def test_chat_starts_after_the_template_and_ends_at_end_of_turn():
    lm = ChatMockLM()
    im_end = lm.tokenizer.ids["<|im_end|>"]
    prompt = chat_prompt(lm.tokenizer, HELLO)
    text = b"".join(lm.byte_vocab[t] for t in prompt.token_ids)
    assert text == b"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nYes or no?<|im_end|>\n" \
                   b"<|im_start|>assistant\n"
    assert prompt.end_of_turn_ids == [im_end] == end_of_turn_ids(lm.tokenizer)
    beam = await ByteBeamState.initial(lm, BeamParams(K=4), chat=HELLO)
    assert beam.states[0].lm_state.context == tuple(prompt.token_ids)
    assert beam.params.eos_tokens == (im_end, 0)  # the end of turn, then the model's EOS
    p = (await beam.logp_next()).probs()
    lp = lm.logprobs(prompt.token_ids)  # (V,) the model after the prompt
    assert p[EOS] == pytest.approx(math.exp(lp[im_end]) + math.exp(lp[0]), rel=1e-5)
    state, out = await ConstrainedState(beam, StringSet(["yes", "no"])).generate(10, rng=0)
    assert state.ended and out in (b"yes", b"no")  # the reply ends by EOS


async def test_chat_keeps_explicit_eos_tokens_and_rejects_bad_input():
    lm = ChatMockLM()
    beam = await ByteBeamState.initial(lm, BeamParams(K=4, eos_tokens=(b"<eos>",)), chat=HELLO)
    assert beam.params.eos_tokens == (b"<eos>",)
    with pytest.raises(ValueError, match="needs a backend with a tokenizer"):
        await ByteBeamState.initial(MockLM(), BeamParams(K=4), chat=HELLO)
    with pytest.raises(ValueError, match="no chat template"):
        await ByteBeamState.initial(ChatMockLM(chat_template=None), BeamParams(K=4), chat=HELLO)
    with pytest.raises(ValueError, match="cannot tell how the chat template ends a reply"):
        await ByteBeamState.initial(ChatMockLM(end="\n"), BeamParams(K=4), chat=HELLO)
    await ByteBeamState.initial(ChatMockLM(end="\n"), BeamParams(K=4, eos_tokens=(0,)), chat=HELLO)  # given: fine
    with pytest.raises(ValueError, match="not both"):
        await ByteBeamState.initial(lm, BeamParams(K=4), [0], chat=HELLO)
    with pytest.raises(ValueError, match="chat is empty"):
        await ByteBeamState.initial(lm, BeamParams(K=4), chat=[])
    with pytest.raises(TypeError, match="'role' and 'content'"):
        await ByteBeamState.initial(lm, BeamParams(K=4), chat=[{"role": "user"}])
    with pytest.raises(TypeError, match="list of messages"):
        await ByteBeamState.initial(lm, BeamParams(K=4), chat="Hi")


# --------------------------------------------------------------------------- embedded model

SCHEMAS = {
    "yes/no": {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}},
               "required": ["answer"], "additionalProperties": False},
    "person": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                                "age": {"type": "integer", "minimum": 0, "maximum": 120}},
               "required": ["name", "age"], "additionalProperties": False},
    "colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3},
}
QUESTIONS = {
    "yes/no": "Is the sky blue? Reply in JSON.",
    "person": "Invent a person. Reply in JSON with name and age.",
    "colors": "List two colors as a JSON array.",
}


def beam_params():
    return BeamParams(K=4, prune_threshold=0.05)


@pytest.mark.slow
async def test_embedded_one_word_answer_ends_by_eos(embedded_lm):
    beam = await ByteBeamState.initial(embedded_lm, beam_params(),
                                       chat=[{"role": "user", "content": "What is the capital of France? "
                                                                         "Answer with one word."}])
    out = await beam.greedy(b"", 48)
    assert b"Paris" in out and len(out) < 48, out  # stopped early: EOS
    after = await beam.prefill(out)
    assert (await after.logp_next()).argmax() == EOS


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SCHEMAS))
async def test_embedded_json_replies_parse_validate_and_end(embedded_lm, name):
    schema = SCHEMAS[name]
    beam = await ByteBeamState.initial(embedded_lm, beam_params(),
                                       chat=[{"role": "user", "content": QUESTIONS[name]}])
    cs = ConstrainedState(beam, JsonSchema(schema, max_whitespace=2))
    rng = np.random.default_rng(0)
    for greedy in [True] + [False] * 5:
        state, out = await cs.generate(60, greedy=greedy, rng=rng)
        assert state.ended, (name, out)
        jsonschema.validate(json.loads(out), schema)


@pytest.mark.slow
async def test_embedded_smc_json_every_particle_validates(embedded_lm):
    schema = SCHEMAS["yes/no"]
    beam = await ByteBeamState.initial(embedded_lm, beam_params(),
                                       chat=[{"role": "user", "content": QUESTIONS["yes/no"]}])
    r = await smc(beam, JsonSchema(schema, max_whitespace=0), 4, 24, rng=0)
    assert math.isfinite(r.log_ml)
    for p in r.particles:
        assert p.finished
        jsonschema.validate(json.loads(p.text), schema)
