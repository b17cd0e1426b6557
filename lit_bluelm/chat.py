"""The chat format: the one renderer of conversations, shared by data, generation and evaluation,
and the same format as a Jinja chat template for transformers' ``apply_chat_template``.

A turn renders as ``<|im_start|>{role}\\n{content}<|im_end|>\\n``. A thinking reply is
``<think>\\n{thinking}\\n</think>\\n{answer}``.

* Thinking on: the final user turn's content ends with ``\\n[|BlueThink|]`` (``after_query``, the
  report's placement) or starts with ``[|BlueThink|]\\n`` (``before_query``); the final assistant
  reply starts with ``<think>`` (written by the model: nothing is prefilled).
* Thinking off: no control token, and the reply is the answer alone.
* The mode is ``enable_thinking`` when given, else whether the final message is an assistant
  message with a ``thinking`` string (a training sample says which mode it trains).
* Multi-turn: the last turn's mode wins; earlier assistant turns keep only their answers.

Trained spans (SFT): every assistant turn's rendered content and its closing ``<|im_end|>``;
never system or user text, nor the control token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from lit_bluelm.config.schema import THINK_POSITIONS
from lit_bluelm.errors import ConfigError
from lit_bluelm.tokenizer import IM_END, IM_START, THINK_CONTROL, THINK_END, THINK_START

ROLES = ("system", "user", "assistant")
Message = Dict[str, str]


@dataclass
class Rendered:
    text: str
    trained: List[Tuple[int, int]]  # [start, stop) character spans of the assistant replies


def thinking_answer(thinking: str, answer: str) -> str:
    """An assistant reply that reasons first."""
    return f"{THINK_START}\n{thinking}\n{THINK_END}\n{answer}"


def split_reply(text: str) -> Tuple[Optional[str], str]:
    """A generated reply as (thinking, answer): the text inside the ``<think>`` ... ``</think>``
    block the reply opens with, and the text after it, both stripped of surrounding newlines and
    spaces; a block never closed has no answer. Without a block: (None, the whole reply)."""
    if not text.startswith(THINK_START):
        return None, text.strip()
    body = text[len(THINK_START) :]
    thinking, _, answer = body.partition(THINK_END)
    return thinking.strip(), answer.strip()


def cot_messages(question: str, thinking: str, answer: str) -> List[Message]:
    """A chain-of-thought sample (stage 3) as a two-turn conversation, reasoning written inline."""
    return [
        {"role": "user", "content": question},
        {"role": "assistant", "content": thinking_answer(thinking, answer)},
    ]


def _check(messages: Sequence[Message]) -> None:
    if not messages:
        raise ValueError("a conversation needs at least one message")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise ValueError(f"a chat message is a {{'role', 'content'}} object, got {m!r}"[:200])
        if m.get("role") not in ROLES:
            raise ValueError(f"unknown chat role '{m.get('role')}'; valid: {', '.join(ROLES)}")
        if "thinking" in m and (m["role"] != "assistant" or not isinstance(m["thinking"], str)):
            raise ValueError("'thinking' is a string on an assistant message")


def thinking_mode(messages: Sequence[Message], enable_thinking: Optional[bool] = None) -> bool:
    """Whether a conversation is rendered in the thinking mode (see the module docstring)."""
    if enable_thinking is not None:
        return bool(enable_thinking)
    last = messages[-1]
    return last["role"] == "assistant" and isinstance(last.get("thinking"), str)


def render(
    messages: Sequence[Message],
    enable_thinking: Optional[bool] = None,
    think_position: str = "after_query",
    add_generation_prompt: bool = False,
) -> Rendered:
    """The conversation in the chat format, with its trained spans."""
    _check(messages)
    if think_position not in THINK_POSITIONS:
        raise ConfigError(
            f"sft.think_token_position: unknown '{think_position}'; valid: {', '.join(THINK_POSITIONS)}"
        )
    think = thinking_mode(messages, enable_thinking)
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    text, trained = "", []
    for i, m in enumerate(messages):
        content = m["content"]
        if think and i == last_user:
            content = (
                f"{content}\n{THINK_CONTROL}"
                if think_position == "after_query"
                else f"{THINK_CONTROL}\n{content}"
            )
        elif think and m["role"] == "assistant" and i == len(messages) - 1 and "thinking" in m:
            content = thinking_answer(m["thinking"], content)
        text += f"{IM_START}{m['role']}\n"
        start = len(text)
        text += f"{content}{IM_END}"
        if m["role"] == "assistant":
            trained.append((start, len(text)))
        text += "\n"
    if add_generation_prompt:
        text += f"{IM_START}assistant\n"
    return Rendered(text, trained)


def render_chat(messages: Sequence[Message], **kwargs) -> str:
    """The text of :func:`render` (``enable_thinking``, ``think_position``, ``add_generation_prompt``)."""
    return render(messages, **kwargs).text


# The same format for transformers' apply_chat_template(messages, enable_thinking=...,
# add_generation_prompt=...); __POSITION__ is the run's sft.think_token_position. A test checks
# that it renders exactly what render() does.
CHAT_TEMPLATE = (
    "{%- set position = think_token_position if think_token_position is defined else '__POSITION__' -%}"
    "{%- if enable_thinking is defined and enable_thinking is not none -%}"
    "{%- set think = enable_thinking -%}"
    "{%- else -%}"
    "{%- set think = messages[-1].role == 'assistant' and messages[-1].thinking is defined"
    " and messages[-1].thinking is string -%}"
    "{%- endif -%}"
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for m in messages -%}"
    "{{- '" + IM_START + "' + m.role + '\\n' -}}"
    "{%- if think and loop.index0 == ns.last_user -%}"
    "{%- if position == 'before_query' -%}{{- '" + THINK_CONTROL + "\\n' + m.content -}}"
    "{%- else -%}{{- m.content + '\\n" + THINK_CONTROL + "' -}}{%- endif -%}"
    "{%- elif think and m.role == 'assistant' and loop.last and m.thinking is defined -%}"
    "{{- '" + THINK_START + "\\n' + m.thinking + '\\n" + THINK_END + "\\n' + m.content -}}"
    "{%- else -%}{{- m.content -}}{%- endif -%}"
    "{{- '" + IM_END + "\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '" + IM_START + "assistant\\n' -}}{%- endif -%}"
)


def chat_template(think_position: str = "after_query") -> str:
    """The Jinja chat template with ``think_position`` as its default placement."""
    if think_position not in THINK_POSITIONS:
        raise ValueError(f"unknown think_position '{think_position}'")
    return CHAT_TEMPLATE.replace("__POSITION__", think_position)
