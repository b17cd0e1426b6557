"""The demo's claims: what each stage must show, judged on its run's own outputs.

A claim is a function of the :class:`Evidence` of one demo run (the stages' ``summary.json``
records and the evaluation rows) that returns a :class:`Claim`, or None when the run holds no
evidence for it (``make demo-seeds`` does not rerun the text stage, so the distillation claim is
absent there). :data:`CLAIMS` is the one list ``make demo`` and ``make demo-seeds`` judge; a later
stage adds its claims here (GRPO's, the last ones, are also :data:`RL_CLAIMS`). Over several seeds
(:func:`over_seeds`) a claim judged on ``every`` seed is met when it holds on each one; one judged
on the ``mean`` is computed once more on the seeds' mean evaluation rows (:func:`mean_rows`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from lit_bluelm.evaluation import Row
from lit_bluelm.needle import PasskeyRow, by_length

ARITH = "demo_arith"
BUDGETS = (0, 8, 32, 128)
TOP = max(BUDGETS)
THINK_GAIN = 0.40  # demo_arith: think@128 over no-think, on every seed
PERCEPTION = {"demo_color": 0.90, "demo_count": 0.70}  # no-think accuracy of the image tasks
THINK_HURTS = 0.05  # image tasks: think@128 may trail no-think by at most this
PASSKEY_GAIN = (4.0, 0.20)  # at 4x the original context, after the switch >= before + 0.20
PASSKEY_KEEP = (1.0, -0.05)  # at 1x, after >= before - 0.05 (accuracies averaged over depths)
SHORT_LOSS = 1.05  # the reasoning stage's validation sources: loss after long context <= 1.05 x
REWARD = "reward"
REWARD_ACCURACY = 0.90  # held-out pairs ranked right, all types together
REWARD_PER_TYPE = 0.80  # ... and of each pair type (source)
REWARD_PAIRS = 300  # held-out pairs the accuracy is measured on, at least
RL = "rl"
RL_GAIN = (0.03, 2.0)  # think demo_arith sampled pass@1: after >= before + max(0.03, 2 stderr)
RL_KEEP = 1.0  # greedy think@128 of every task: after >= before - 1 stderr of the difference
# the evaluations of the RL checkpoint and their SFT baselines (Evidence.evals keys)
EVAL_RL, EVAL_SFT_SAMPLED, EVAL_RL_SAMPLED = "eval_rl", "eval_sft_sampled", "eval_rl_sampled"
LONG = "long_context"
SHORT = "long_context_short"  # the long-context model on the reasoning stage's validation sources


@dataclass(frozen=True)
class Claim:
    name: str
    target: str  # how ``value`` is judged, for the reader (">= 0.40")
    value: float
    met: bool


@dataclass
class Evidence:
    """One demo run: ``summaries`` by stage name (summary.json) and the evaluation's rows."""

    summaries: Dict[str, dict] = field(default_factory=dict)
    rows: List[Row] = field(default_factory=list)
    # the passkey evaluation "before" (the reasoning checkpoint) and "after" (the long-context one)
    passkey: Dict[str, List[PasskeyRow]] = field(default_factory=dict)
    # more evaluations' rows by name (the RL checkpoint's, and the sampled SFT baseline)
    evals: Dict[str, List[Row]] = field(default_factory=dict)

    def row(
        self, task: str, mode: str, budget: Optional[int] = None, rows: Optional[Sequence[Row]] = None
    ) -> Optional[Row]:
        """The row of (task, mode, budget) in the SFT evaluation, or in ``rows``."""
        budget = None if mode == "no_think" else budget
        found = self.rows if rows is None else rows
        return next((r for r in found if (r.task, r.mode, r.budget) == (task, mode, budget)), None)


def _at_least(name: str, value: float, threshold: float) -> Claim:
    # accuracies are fractions k/n: a difference that equals the threshold may round below it
    return Claim(name, f">= {threshold:g}", value, value >= threshold - 1e-9)


def distilled_beats_scratch(ev: Evidence) -> Optional[Claim]:
    text, scratch = ev.summaries.get("text"), ev.summaries.get("text_scratch")
    if not text or not scratch or text.get("val_loss_after") is None:
        return None
    a, b = text["val_loss_after"], scratch.get("val_loss_after")
    if b is None:
        return None
    return Claim("text: distilled val/loss < scratch's", f"< {b:.4f}", a, a < b)


def format_failures(rows: Sequence[Row]) -> List[str]:
    """The deterministic targets of the thinking format, each failure as a line: think mode opens
    ``<think>`` on >= 95% of replies, no-think on <= 5%, every reply within its budget."""
    failures = []
    for r in rows:
        where = f"{r.task} {r.mode} budget={r.budget}"
        if r.mode == "think" and r.think_open_rate < 0.95:
            failures.append(f"{where}: think_open_rate {r.think_open_rate:.3f} < 0.95")
        if r.mode == "no_think" and r.think_open_rate > 0.05:
            failures.append(f"{where}: think_open_rate {r.think_open_rate:.3f} > 0.05")
        if r.within_budget != 1.0:
            failures.append(f"{where}: within_budget {r.within_budget:.3f} != 1.0")
    return failures


def thinking_format(ev: Evidence) -> Optional[Claim]:
    if not ev.rows:
        return None
    n = len(format_failures(ev.rows))
    return Claim("thinking format: rows off target (open rate, budget)", "== 0", float(n), n == 0)


def think_gain(ev: Evidence) -> Optional[Claim]:
    top, plain = ev.row(ARITH, "think", TOP), ev.row(ARITH, "no_think")
    if top is None or plain is None:
        return None
    return _at_least(f"{ARITH}: think@{TOP} - no_think", top.accuracy - plain.accuracy, THINK_GAIN)


def budget_monotone(ev: Evidence) -> Optional[Claim]:
    """Accuracy non-decreasing in the budget within one standard error: the value is the least
    ``acc[next] - acc[prev] + stderr(difference)`` over consecutive budgets (>= 0 to hold)."""
    rows = [ev.row(ARITH, "think", b) for b in BUDGETS]
    if any(r is None for r in rows):
        return None
    slack = min(
        b.accuracy - a.accuracy + math.hypot(a.stderr, b.stderr) for a, b in zip(rows, rows[1:], strict=False)
    )
    budgets = "/".join(map(str, BUDGETS))
    return _at_least(f"{ARITH}: accuracy rises with budget {budgets} (1 stderr)", slack, 0)


def _perception(task: str, threshold: float) -> Callable[[Evidence], Optional[Claim]]:
    def claim(ev: Evidence) -> Optional[Claim]:
        plain = ev.row(task, "no_think")
        return None if plain is None else _at_least(f"{task}: no_think accuracy", plain.accuracy, threshold)

    return claim


def _thinking_keeps(task: str) -> Callable[[Evidence], Optional[Claim]]:
    def claim(ev: Evidence) -> Optional[Claim]:
        top, plain = ev.row(task, "think", TOP), ev.row(task, "no_think")
        if top is None or plain is None:
            return None
        return _at_least(f"{task}: think@{TOP} - no_think", top.accuracy - plain.accuracy, -THINK_HURTS)

    return claim


def _passkey(factor: float, threshold: float) -> Callable[[Evidence], Optional[Claim]]:
    def claim(ev: Evidence) -> Optional[Claim]:
        before, after = (by_length(ev.passkey.get(k, [])) for k in ("before", "after"))
        if factor not in before or factor not in after:
            return None
        return _at_least(
            f"passkey at {factor:g}x context: after - before", after[factor] - before[factor], threshold
        )

    return claim


def short_context_kept(ev: Evidence) -> Optional[Claim]:
    """The worst ratio, over the reasoning stage's validation sources, of the long-context model's
    loss (``long_context_short``: the same validation batches) to the reasoning model's."""
    before = (ev.summaries.get("reasoning") or {}).get("val_loss_after_by_source") or {}
    after = (ev.summaries.get(SHORT) or {}).get("val_loss_after_by_source") or {}
    common = [k for k in before if k in after and before[k]]
    if not common:
        return None
    worst = max(after[k] / before[k] for k in common)
    return Claim(
        f"{LONG}: reasoning val/loss by source, after / before",
        f"<= {SHORT_LOSS:g}",
        worst,
        worst <= SHORT_LOSS,
    )


def _reward_after(ev: Evidence) -> Optional[dict]:
    summary = ev.summaries.get(REWARD)
    return summary if summary and summary.get("val_accuracy_after") is not None else None


def reward_accuracy(ev: Evidence) -> Optional[Claim]:
    summary = _reward_after(ev)
    if summary is None:
        return None
    return _at_least(f"{REWARD}: held-out pair accuracy", summary["val_accuracy_after"], REWARD_ACCURACY)


def reward_per_type(ev: Evidence) -> Optional[Claim]:
    """The worst pair type's held-out accuracy (each type is a source of the reward stage)."""
    summary = _reward_after(ev)
    by_source = (summary or {}).get("val_accuracy_after_by_source") or {}
    if not by_source:
        return None
    return _at_least(f"{REWARD}: worst pair type's accuracy", min(by_source.values()), REWARD_PER_TYPE)


def reward_pairs(ev: Evidence) -> Optional[Claim]:
    summary = _reward_after(ev)
    if summary is None or summary.get("val_pairs_after") is None:
        return None
    return _at_least(f"{REWARD}: held-out pairs measured", summary["val_pairs_after"], REWARD_PAIRS)


def rl_sampled_gain(ev: Evidence) -> Optional[Claim]:
    """Think-mode ``demo_arith`` sampled pass@1 of the RL checkpoint over the SFT one's, less the
    margin it must clear (``max(0.03, 2 stderr of the difference)``): >= 0 to hold."""
    before = ev.row(ARITH, "think", TOP, ev.evals.get(EVAL_SFT_SAMPLED, []))
    after = ev.row(ARITH, "think", TOP, ev.evals.get(EVAL_RL_SAMPLED, []))
    if before is None or after is None:
        return None
    low, sigmas = RL_GAIN
    margin = max(low, sigmas * math.hypot(before.stderr, after.stderr))
    name = f"{RL}: {ARITH} think sampled pass@1 gain - max({low:g}, {sigmas:g} stderr)"
    return _at_least(name, after.accuracy - before.accuracy - margin, 0)


def rl_keeps_greedy(ev: Evidence) -> Optional[Claim]:
    """Greedy think@128 of the RL checkpoint against the SFT one's on every task, plus one
    stderr of the difference: the worst task's (>= 0 to hold)."""
    after_rows = ev.evals.get(EVAL_RL, [])
    slack = []
    for r in after_rows:
        if r.mode != "think" or r.budget != TOP:
            continue
        before = ev.row(r.task, "think", TOP)
        if before is not None:
            slack.append(r.accuracy - before.accuracy + RL_KEEP * math.hypot(r.stderr, before.stderr))
    if not slack:
        return None
    return _at_least(f"{RL}: greedy think@{TOP} - SFT's + {RL_KEEP:g} stderr, worst task", min(slack), 0)


def rl_rewards_rise(ev: Evidence) -> Optional[Claim]:
    """Each route's (task's) mean training reward over the last tenth of the steps minus its mean
    over the first tenth: the smallest (> 0 to hold)."""
    summary = ev.summaries.get(RL) or {}
    first, last = summary.get("reward_first_by_task") or {}, summary.get("reward_last_by_task") or {}
    common = [t for t in first if t in last]
    if not common:
        return None
    worst = min(last[t] - first[t] for t in common)
    return Claim(f"{RL}: each route's reward, last tenth of steps - first", "> 0", worst, worst > 0)


# (claim, how it is judged over seeds: "every" seed or the seeds' "mean")
ClaimFns = Tuple[Tuple[Callable[[Evidence], Optional[Claim]], str], ...]
# GRPO's claims (the last of CLAIMS)
RL_CLAIMS: ClaimFns = (
    (rl_sampled_gain, "every"),
    (rl_keeps_greedy, "every"),
    (rl_rewards_rise, "every"),
)
CLAIMS: ClaimFns = (
    (distilled_beats_scratch, "every"),
    (thinking_format, "every"),
    (think_gain, "every"),
    (budget_monotone, "mean"),
    *((_perception(task, threshold), "every") for task, threshold in PERCEPTION.items()),
    *((_thinking_keeps(task), "every") for task in PERCEPTION),
    (_passkey(*PASSKEY_GAIN), "every"),
    (_passkey(*PASSKEY_KEEP), "every"),
    (short_context_kept, "every"),
    (reward_accuracy, "every"),
    (reward_per_type, "every"),
    (reward_pairs, "every"),
    *RL_CLAIMS,
)


def judge(ev: Evidence, claims: ClaimFns = CLAIMS) -> List[Claim]:
    """Every claim of ``claims`` (:data:`CLAIMS`: ``make demo``'s) that ``ev`` holds evidence
    for, in order."""
    return [c for c in (fn(ev) for fn, _ in claims) if c is not None]


def mean_rows(runs: Sequence[List[Row]]) -> List[Row]:
    """Rows averaged over runs (by task, mode and budget); the stderr of a mean of n runs."""
    groups: Dict[tuple, List[Row]] = {}
    for rows in runs:
        for r in rows:
            groups.setdefault((r.task, r.mode, r.budget), []).append(r)
    out = []
    for (task, mode, budget), rs in groups.items():
        n = len(rs)
        out.append(
            Row(
                task,
                mode,
                budget,
                sum(r.accuracy for r in rs) / n,
                math.sqrt(sum(r.stderr**2 for r in rs)) / n,
                sum(r.n for r in rs),
                sum(r.mean_thinking_tokens for r in rs) / n,
                sum(r.think_open_rate for r in rs) / n,
                min(r.within_budget for r in rs),
            )
        )
    return out


@dataclass(frozen=True)
class SeedClaim:
    name: str
    target: str
    mean: float
    min: float
    judged_on: str  # "every" seed or the "mean" rows
    met: bool


def over_seeds(runs: Sequence[Evidence], claim_fns: ClaimFns = CLAIMS) -> List[SeedClaim]:
    """Each claim of ``claim_fns`` over the seeds' runs: the mean and the min of its values, met
    as it is judged."""
    on_mean = Evidence(rows=mean_rows([ev.rows for ev in runs]))  # only "mean" claims read it
    out = []
    for fn, judged_on in claim_fns:
        claims = [fn(ev) for ev in runs]
        if not claims or any(c is None for c in claims):
            continue
        values = [c.value for c in claims]
        met = all(c.met for c in claims)
        if judged_on == "mean":
            mean_claim = fn(on_mean)
            met = mean_claim is not None and mean_claim.met
        first = claims[0]
        out.append(
            SeedClaim(first.name, first.target, sum(values) / len(values), min(values), judged_on, met)
        )
    return out


def claims_block(claims: Sequence[Claim]) -> str:
    """The printed block: ``claim ... target ... measured ... met|missed``, one line a claim."""
    width = max([len(c.name) for c in claims] + [5])
    lines = [f"{'claim':<{width}}  {'target':>10}  {'measured':>9}  result"]
    for c in claims:
        lines.append(f"{c.name:<{width}}  {c.target:>10}  {c.value:>9.4f}  {'met' if c.met else 'missed'}")
    return "\n".join(lines)


def seeds_block(claims: Sequence[SeedClaim], seeds: Sequence[int]) -> str:
    width = max([len(c.name) for c in claims] + [5])
    lines = [
        f"claims over seeds {', '.join(map(str, seeds))} (met: on every seed, or on the mean where marked)",
        f"{'claim':<{width}}  {'target':>10}  {'mean':>9}  {'min':>9}  result",
    ]
    for c in claims:
        result = ("met" if c.met else "missed") + (" (on the mean)" if c.judged_on == "mean" else "")
        lines.append(f"{c.name:<{width}}  {c.target:>10}  {c.mean:>9.4f}  {c.min:>9.4f}  {result}")
    return "\n".join(lines)
