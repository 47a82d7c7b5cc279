"""Chat prompts: a conversation rendered by the tokenizer's chat template, and where a reply ends.

Every backend with a Hugging Face tokenizer (``lm.tokenizer``: ``AsyncTransformer``,
``AsyncVLLM``) uses these functions, so a chat prompt means the same token ids
everywhere:

- :func:`chat_prompt` renders ``[{"role": ..., "content": ...}, ...]`` with the
  template's generation prompt (e.g. ``<|im_start|>assistant\\n``) and encodes it
  without adding special tokens again (the template writes its own BOS);
- :func:`end_of_turn_ids` finds the token the template writes after an
  assistant message (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``), which
  ends a reply.

Example:
    >>> prompt = chat_prompt(lm.tokenizer, [{"role": "user", "content": "Hi"}])  # doctest: +SKIP
    >>> lm.tokenizer.decode(prompt.token_ids)[-23:], prompt.end_of_turn_ids       # doctest: +SKIP
    ('<|im_start|>assistant\\n', [2])

Not handled: tool calls, images, content that is not a plain string, template
arguments beyond ``add_generation_prompt``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

# A reply the template cannot confuse with its own markup, used to find what follows a reply.
_PROBE_REPLY = "Zq7xPROBEx7qZ"


@dataclass(frozen=True)
class ChatPrompt:
    """A rendered conversation.

    Attributes:
        token_ids: the conversation and the generation prompt, as token ids.
        end_of_turn_ids: token ids that end the assistant's reply (empty when not asked for).
    """

    token_ids: list[int]
    end_of_turn_ids: list[int]


def check_messages(messages) -> list[dict[str, str]]:
    """``messages`` as a list of ``{"role": str, "content": str}`` dicts, or a ValueError/TypeError."""
    if isinstance(messages, (str, bytes, dict)) or not hasattr(messages, "__iter__"):
        raise TypeError(f"chat must be a list of messages like [{{'role': 'user', 'content': 'Hi'}}], "
                        f"got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise TypeError(f"chat message {i} must be a dict with str 'role' and 'content', got {m!r}")
        out.append({"role": m["role"], "content": m["content"]})
    if not out:
        raise ValueError("chat is empty: pass at least one message, e.g. [{'role': 'user', 'content': 'Hi'}]")
    return out


def tokenizer_of(lm: Any):
    """The HF tokenizer of a backend (``lm.tokenizer``), with a chat template, or a ValueError."""
    tokenizer = getattr(lm, "tokenizer", None)
    if tokenizer is None:
        raise ValueError(f"chat= needs a backend with a tokenizer (lm.tokenizer); {type(lm).__name__} has none: "
                         f"pass the prompt as initial_context= token ids instead")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"the tokenizer of {type(lm).__name__} has no chat template (tokenizer.chat_template); "
                         f"chat= needs one: use a chat/instruct model or set tokenizer.chat_template")
    return tokenizer


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                             tokenize=False)
    except Exception as e:  # noqa: BLE001 - jinja errors of user templates ("roles must alternate", ...)
        raise ValueError(f"the chat template rejects these messages: {e}") from None


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def end_of_turn_ids(tokenizer) -> list[int]:
    """The token the chat template writes right after an assistant reply, as ``[id]``.

    Raises:
        ValueError: the template writes no special token there (then pass the reply's end tokens
            explicitly, e.g. ``BeamParams(eos_tokens=...)``).
    """
    text = _render(tokenizer, [{"role": "user", "content": "Hi"},
                               {"role": "assistant", "content": _PROBE_REPLY}], add_generation_prompt=False)
    at = text.find(_PROBE_REPLY)
    after = text[at + len(_PROBE_REPLY):] if at >= 0 else ""
    special = set(getattr(tokenizer, "all_special_ids", ())) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    ids = _encode(tokenizer, after) if after else []
    if ids and ids[0] in special:
        return [int(ids[0])]
    raise ValueError(f"cannot tell how the chat template ends a reply (it writes {after[:40]!r} after one): "
                     f"pass the end-of-turn tokens explicitly, e.g. BeamParams(eos_tokens=(b'<|im_end|>',))")


def chat_prompt(tokenizer, messages, *, end_of_turn: bool = True) -> ChatPrompt:
    """Render ``messages`` with ``tokenizer``'s chat template and the generation prompt.

    Args:
        tokenizer: a HF tokenizer with a ``chat_template``.
        messages: ``[{"role": "system" | "user" | "assistant", "content": str}, ...]``.
        end_of_turn: also find the end-of-turn token (:func:`end_of_turn_ids`).

    Returns:
        A :class:`ChatPrompt`.
    """
    messages = check_messages(messages)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template (tokenizer.chat_template)")
    ids = _encode(tokenizer, _render(tokenizer, messages, add_generation_prompt=True))
    eot = end_of_turn_ids(tokenizer) if end_of_turn else []
    logger.debug("chat prompt: %d tokens, end of turn %s", len(ids), eot)
    return ChatPrompt(token_ids=ids, end_of_turn_ids=eot)
