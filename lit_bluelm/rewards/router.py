"""The reward router: each sample's task names its reward functions and weights
(``rewards.routes``), the rule functions run in worker processes under a wall-clock limit, the
learned reward model scores its samples in one batch, and a sample's reward is the weighted mean
of the scores it got.

    rewards:
      routes:
        demo_arith: [{fn: math, weight: 1.0}, {fn: think_format, weight: 0.1}]
        demo_open: [{fn: reward_model, weight: 1.0}, {fn: exact, weight: 0.0}]
      model: runs/demo/reward     # the reward run reward_model scores with
      workers: 2                  # rule-scoring processes
      timeout_s: 10               # wall-clock limit of one rule call

* A function that does not apply returns no score (``None``); it is left out of the mean, never
  counted as 0. A sample with no score at all has reward NaN: the loss leaves it out and the
  step counts it (``reward/unscored``).
* A weight of 0 computes and logs the function (``reward/fn/<name>``) without counting it: how
  the demo reports exact match beside the learned reward on open prompts.
* A rule that raises is a failure, one that passes ``timeout_s`` a timeout: both are counted by
  function (:class:`Scores`), the sample gets no score from it, and training goes on. A hung
  worker is replaced (its pool is terminated and restarted; the other calls are resubmitted).
  ``math-verify`` sets its own timeouts with SIGALRM, which works only in a process's main
  thread: each worker runs its calls there.
"""

from __future__ import annotations

import math
import multiprocessing
import traceback
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from lit_bluelm.errors import ConfigError
from lit_bluelm.objectives.grpo import RewardsConfig, Route, uses_learned
from lit_bluelm.rewards.rules import LEARNED, RULES, Sample

__all__ = ["RewardRouter", "RewardsConfig", "Route", "Scores", "uses_learned"]


@dataclass
class Scores:
    """What the router found for a list of samples."""

    rewards: List[float]  # the weighted mean per sample (NaN: no score)
    by_fn: Dict[str, List[Optional[float]]]  # each function's score per sample (None: not routed or none)
    failures: Dict[str, int] = field(default_factory=dict)  # raised, by function
    timeouts: Dict[str, int] = field(default_factory=dict)  # passed timeout_s, by function
    errors: List[str] = field(default_factory=list)  # one line per failure (the first few kept)
    unrouted: int = 0  # samples of a task without a route (no score)


def _warm_up() -> None:
    """A worker's start: the rules and math-verify imported before any call is timed."""
    import math_verify  # noqa: F401

    import lit_bluelm.evaluation  # noqa: F401
    import lit_bluelm.rewards.rules  # noqa: F401


def _ready(_: int) -> bool:
    return True


def _call(fn: Any, sample: Sample) -> Tuple[str, Any]:
    """Run a rule on ``sample`` (in a worker: the function travels by its module and name, so a
    rule registered in any importable module works there): ("ok", score) or ("error", one line)."""
    try:
        value = fn(sample)
        return "ok", None if value is None else float(value)
    except Exception as err:  # a failing rule is counted, never a stop
        last = traceback.extract_tb(err.__traceback__)[-1]
        return "error", f"{type(err).__name__}: {err} ({last.filename}:{last.lineno})"[:300]


def check_names(routes: Any) -> None:
    """Every routed function is registered (a rule, or ``reward_model``): one line naming the
    key otherwise (start-up of ``module: rl``; rules register when their module is imported)."""
    names = sorted(RULES) + [LEARNED]
    for task, task_routes in routes.items():
        for i, route in enumerate(task_routes):
            if route.fn not in names:
                raise ConfigError(
                    f"rewards.routes.{task}[{i}].fn: unknown reward '{route.fn}'; valid: {', '.join(names)}"
                )


class RewardRouter:
    """Scores samples by their task's routes; ``learned`` is a callable (samples -> rewards)
    for ``reward_model`` (built from ``rewards.model`` by the caller, who knows the device)."""

    MAX_ERRORS = 5

    def __init__(self, cfg: RewardsConfig, learned: Any = None) -> None:
        self.cfg = cfg
        self.routes = {
            task: [r if isinstance(r, Route) else Route(**dict(r)) for r in routes]
            for task, routes in cfg.routes.items()
        }
        check_names(self.routes)
        self.learned = learned
        self._pool: Any = None

    # ------------------------------------------------------------------ workers

    def _start(self) -> Any:
        if self._pool is None:
            # spawn: a fresh interpreter (no copy of the trainer's threads, CUDA or torch state);
            # the limit counts from a ready worker: start-up and imports are waited for here
            pool = multiprocessing.get_context("spawn").Pool(self.cfg.workers, initializer=_warm_up)
            pool.map(_ready, range(self.cfg.workers))
            self._pool = pool
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def __del__(self) -> None:  # pragma: no cover - best effort at interpreter exit
        try:
            self.close()
        except Exception:
            pass

    def _run_rules(self, calls: List[Tuple[str, Sample]]) -> List[Tuple[str, Any]]:
        """Each (rule, sample) call's ("ok", score) / ("error", line) / ("timeout", None)."""
        if self.cfg.workers == 0:
            return [_call(RULES[name], sample) for name, sample in calls]
        results: Dict[int, Tuple[str, Any]] = {}
        pending = list(range(len(calls)))
        while pending:
            pool = self._start()
            handles = {i: pool.apply_async(_call, (RULES[calls[i][0]], calls[i][1])) for i in pending}
            hung = None
            for i in pending:  # FIFO: call i started before its wait began, so it had timeout_s
                try:
                    results[i] = handles[i].get(timeout=self.cfg.timeout_s)
                except multiprocessing.TimeoutError:
                    hung = i
                    break
                except Exception as err:  # the call could not be sent or its result not received
                    results[i] = ("error", f"{type(err).__name__}: {err}"[:300])
            if hung is None:
                break
            # a call passed its limit: its worker is stuck; replace the pool and resubmit the rest
            results[hung] = ("timeout", None)
            self.close()
            pending = [i for i in pending if i not in results]
        return [results[i] for i in range(len(calls))]

    # ------------------------------------------------------------------ scoring

    def score(self, samples: Sequence[Sample], learned_inputs: Optional[Sequence[Any]] = None) -> Scores:
        """Rewards of ``samples``; ``learned_inputs[i]`` is what ``learned`` scores for sample i
        (a conversation), needed when a route uses ``reward_model``. A sample of a task without a
        route gets no score (NaN), counted in ``Scores.unrouted``."""
        routes = [self.routes.get(s.task, []) for s in samples]
        names = sorted({r.fn for task_routes in routes for r in task_routes})
        by_fn: Dict[str, List[Optional[float]]] = {name: [None] * len(samples) for name in names}
        failures: Dict[str, int] = {}
        timeouts: Dict[str, int] = {}
        errors: List[str] = []
        calls, where = [], []
        for i, sample in enumerate(samples):
            for route in routes[i]:
                if route.fn != LEARNED:
                    calls.append((route.fn, sample))
                    where.append((route.fn, i))
        for (name, i), (status, value) in zip(where, self._run_rules(calls), strict=True):
            if status == "ok":
                by_fn[name][i] = value
            elif status == "timeout":
                timeouts[name] = timeouts.get(name, 0) + 1
            else:
                failures[name] = failures.get(name, 0) + 1
                if len(errors) < self.MAX_ERRORS:
                    errors.append(f"{name} on sample {i}: {value}")
        learned = [i for i in range(len(samples)) if any(r.fn == LEARNED for r in routes[i])]
        if learned:
            if self.learned is None or learned_inputs is None:
                raise ConfigError("rewards.routes use reward_model but the router has no reward model")
            try:
                values = self.learned([learned_inputs[i] for i in learned])
                for i, value in zip(learned, values, strict=True):
                    by_fn[LEARNED][i] = float(value)
            except Exception as err:  # counted like a failing rule
                failures[LEARNED] = failures.get(LEARNED, 0) + len(learned)
                if len(errors) < self.MAX_ERRORS:
                    errors.append(f"{LEARNED}: {type(err).__name__}: {err}"[:300])
        rewards = []
        for i in range(len(samples)):
            total = weight = 0.0
            for route in routes[i]:
                value = by_fn[route.fn][i]
                if value is not None and route.weight > 0:
                    total += route.weight * value
                    weight += route.weight
            rewards.append(total / weight if weight > 0 else math.nan)
        unrouted = sum(1 for r in routes if not r)
        return Scores(rewards, by_fn, failures, timeouts, errors, unrouted)
