"""The chat format shared by data, generation and evaluation.

A conversation renders as ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per turn. Reasoning is
written inside the assistant turn as ``<think>\\n{thinking}\\n</think>\\n{answer}``.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

from lit_bluelm.tokenizer import IM_END, IM_START, THINK_END, THINK_START

ROLES = ("system", "user", "assistant")
Message = Dict[str, str]


def render_turn(role: str, content: str) -> str:
    if role not in ROLES:
        raise ValueError(f"unknown chat role '{role}'; valid: {', '.join(ROLES)}")
    return f"{IM_START}{role}\n{content}{IM_END}\n"


def render_chat(messages: Sequence[Message]) -> str:
    """Every turn of ``messages`` (``{"role": ..., "content": ...}`` dicts) in the chat format."""
    if not messages:
        raise ValueError("a conversation needs at least one message")
    out = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise ValueError(f"a chat message is a {{'role', 'content'}} object, got {m!r}"[:200])
        out.append(render_turn(str(m.get("role")), m["content"]))
    return "".join(out)


def thinking_answer(thinking: str, answer: str) -> str:
    """An assistant reply that reasons first."""
    return f"{THINK_START}\n{thinking}\n{THINK_END}\n{answer}"


def cot_messages(question: str, thinking: str, answer: str) -> List[Message]:
    """A chain-of-thought sample as a two-turn conversation."""
    return [
        {"role": "user", "content": question},
        {"role": "assistant", "content": thinking_answer(thinking, answer)},
    ]
