"""Rule rewards: functions of one scored completion (a :class:`Sample`) that return a score, or
``None`` where they do not apply (a sample without a gold answer for an answer check). A
``None`` is no score: the router leaves it out of the weighted mean, never counts it as 0.

The registry (:data:`RULES`, names for ``rewards.routes``):

* ``math``: the answer (the text after the think block) is equivalent to the gold one by
  ``math-verify`` (1.0 or 0.0); ``numeric``, ``exact``, ``choice``: the evaluation's metrics of
  the same names (``lit_bluelm.evaluation.score``). All need ``answer``; without it, no score.
* ``think_format``: 1.0 when the reply has the shape of its mode: in thinking mode one think
  block, closed, then a non-empty answer (the block's ``<think>`` written by the model or
  prefilled by the chat template, ``Sample.prefilled_think``); in non-thinking mode no think
  block with content and a non-empty answer. Else 0.0.
* ``length``: 1 - completion tokens / the rollout's ``max_new_tokens`` (shorter scores higher;
  give it a small weight).

The learned reward (``reward_model``, :class:`~lit_bluelm.rewards.model.RewardModel`) is routed
like these but scored in the training process, batched; see :mod:`lit_bluelm.rewards.router`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional

from lit_bluelm.chat import split_reply
from lit_bluelm.evaluation import METRICS
from lit_bluelm.objectives.grpo import LEARNED
from lit_bluelm.tokenizer import THINK_END, THINK_START


@dataclass(frozen=True)
class Sample:
    """One completion to score, with what the rules read (plain data: it goes to worker
    processes)."""

    task: str
    completion: str  # the generated reply's text (special tokens kept)
    think: bool  # sampled in thinking mode
    answer_gold: Optional[str] = None  # the prompt's gold answer, if it has one
    tokens: int = 0  # completion tokens
    max_new_tokens: int = 1
    finish_reason: str = "stop"
    prefilled_think: bool = False  # the chat template wrote the opening <think> into the prompt

    def reply(self) -> str:
        """The reply as the model wrote it, with a prefilled ``<think>`` put back in front."""
        return (THINK_START + self.completion) if self.prefilled_think else self.completion

    def parts(self):
        """(thinking or None, answer) of the reply (``lit_bluelm.chat.split_reply``)."""
        return split_reply(self.reply())


RuleFn = Callable[[Sample], Optional[float]]
# the rules that compare the answer with the prompt's gold one: the evaluation's metrics
ANSWER_CHECKS = METRICS
RULES: Dict[str, RuleFn] = {}


def rule(name: str) -> Callable[[RuleFn], RuleFn]:
    """Register a rule function under ``name`` (a module-level function: workers import it)."""

    def register(fn: RuleFn) -> RuleFn:
        if name in RULES or name == LEARNED:
            raise ValueError(f"reward function '{name}' is already registered")
        RULES[name] = fn
        return fn

    return register


def _answer_check(metric: str) -> RuleFn:
    def check(sample: Sample) -> Optional[float]:
        from lit_bluelm.evaluation import score

        if sample.answer_gold is None:
            return None
        return 1.0 if score(metric, sample.parts()[1], sample.answer_gold) else 0.0

    check.__name__ = check.__qualname__ = f"{metric}_check"
    return check


math_check = rule("math")(_answer_check("math"))
numeric_check = rule("numeric")(_answer_check("numeric"))
exact_check = rule("exact")(_answer_check("exact"))
choice_check = rule("choice")(_answer_check("choice"))


@rule("think_format")
def think_format(sample: Sample) -> Optional[float]:
    reply = sample.reply()
    thinking, answer = split_reply(reply)
    if sample.think:
        body = reply[len(THINK_START) :] if reply.startswith(THINK_START) else ""
        closed = THINK_END in body and THINK_START not in body and body.count(THINK_END) == 1
        return 1.0 if thinking is not None and closed and answer else 0.0
    return 1.0 if not thinking and answer and THINK_END not in answer and THINK_START not in answer else 0.0


@rule("length")
def length(sample: Sample) -> Optional[float]:
    return 1.0 - min(sample.tokens, sample.max_new_tokens) / max(sample.max_new_tokens, 1)
