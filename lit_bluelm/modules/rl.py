"""GRPO (``stage=rl``): for each prompt of a batch, ``rl.num_generations`` completions sampled by
the generation engine, scored by the reward router (``lit_bluelm.rewards.router``), turned into
group-normalised advantages and trained with the clipped surrogate
(``lit_bluelm.objectives.grpo``) through the chunked per-token loss (no full logits).

One training step of Lightning is one rollout and one update (``trainer.max_steps`` counts
updates; with ``trainer.accumulate_grad_batches`` > 1 each accumulated batch is its own rollout).
With one update per rollout the log-probs at rollout time (the "old" policy) equal the current
forward's, so the ratio is taken against that forward's detached log-probs: the value is 1 and
the gradient is the surrogate's, without a second forward. The sampling temperature divides the
logits of the trained forward too.

A prompt's completions are all in one mode: ``rl.think`` lists the modes, and a prompt takes the
one its key hashes to (stable across resumes). The budget's forced tokens are not trained on.
The rollout seed is a function of ``seed``, the optimizer step, the accumulation index and the
rank: a resumed run samples what the uninterrupted one would have.

Logged (each once per step): ``train/loss`` (the policy loss), ``train/reward`` and
``train/reward_std`` (over scored samples), ``reward/fn/<fn>`` and ``reward/task/<task>``
(means), ``reward/zero_std_frac`` (groups without signal), ``reward/unscored`` (samples without a
score, left out of the loss), ``reward/failures/<fn>`` and ``reward/timeouts/<fn>``,
``rollout/completion_len_mean|max``, ``rollout/thinking_len_mean|max``,
``rollout/truncated_frac`` (completions that reached ``rl.max_new_tokens``), ``train/kl``,
``train/entropy``, ``train/clip_low``, ``train/clip_high`` (fractions of counted tokens),
``time/rollout_s``, ``time/learn_s``. Validation samples ``rl.val_samples`` completions of each
held-out prompt at the rollout temperature: ``val/reward``, ``val/accuracy`` (the mean of the
first answer check of the prompt's route: sampled pass@1), and both by task; the best checkpoint
has the highest ``val/reward``; the summary has ``val_reward_before|after``,
``val_accuracy_before|after``, ``val_reward_after_by_source`` (by task) and
``reward_first_by_task`` / ``reward_last_by_task``: each task's mean training reward over the
first and the last tenth of the steps (the trend the demo judges).
"""

from __future__ import annotations

import math
import time
import zlib
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Optional

import torch
from omegaconf import DictConfig
from torch import nn
from torchmetrics.aggregation import MeanMetric

from lit_bluelm.errors import ConfigError
from lit_bluelm.modules.base import Batch, BlueLMModule
from lit_bluelm.objectives.grpo import group_advantages, stat_means, surrogate_fn, token_mean
from lit_bluelm.rewards.rules import ANSWER_CHECKS  # what val/accuracy reads, in route order


@dataclass
class Rollout:
    """The completions of B prompts x G samples, flattened prompt-major (row i * G + j)."""

    prompt_ids: List[List[int]]  # per row
    generations: List[Any]  # lit_bluelm.generation.Generation per row
    pixel_values: List[Optional[torch.Tensor]]  # per row (a prompt's tiles, repeated per sample)
    rewards: torch.Tensor  # [B, G] (NaN: no score)
    scores: Any  # lit_bluelm.rewards.router.Scores
    tasks: List[str]  # per row
    groups: int
    samples: int


def mode_of(key: str, modes: List[str]) -> str:
    """The rollout mode of a prompt: the one its key hashes to (stable across runs and resumes)."""
    return modes[zlib.crc32(key.encode("utf-8")) % len(modes)]


class RLModule(BlueLMModule):
    best_metric: ClassVar[str] = "val/reward"
    best_mode: ClassVar[str] = "max"
    summary_metrics: ClassVar[Dict[str, str]] = {"val_reward": "val/reward", "val_accuracy": "val/accuracy"}
    summary_by_source: ClassVar[Optional[str]] = "val/reward/"
    reads: ClassVar[str] = "prompts"

    def __init__(self, cfg: Dict[str, Any]) -> None:
        super().__init__(cfg)
        tasks = list(self.cfg.rewards.routes)
        self.val_metrics = nn.ModuleDict({name: MeanMetric() for name in ("reward", "accuracy")})
        self.val_task = nn.ModuleDict(
            {f"{kind}_{task}": MeanMetric() for task in tasks for kind in ("reward", "accuracy")}
        )
        self._tokenizer: Any = None
        self._router: Any = None
        self._generator: Any = None
        self._reference: List[nn.Module] = []  # a list: not a submodule (not saved, not trained)
        self._fsdp_ready = False
        # per optimizer step, per task: [sum of rewards, scored samples] (this rank's; saved in
        # checkpoints, so a resumed run reports the whole run's trend)
        self.reward_history: Dict[int, Dict[str, List[float]]] = {}

    # ------------------------------------------------------------------ start-up

    @classmethod
    def check(cls, cfg: DictConfig, tokenizer: Any) -> None:
        super().check(cfg, tokenizer)
        from lit_bluelm.models.llm import llm_config

        if cfg.data.packing:
            raise ConfigError(f"module={cfg.module}: data.packing must be false (a row is one prompt)")
        if not cfg.rewards.routes:
            raise ConfigError("rewards.routes: no task is routed (module=rl scores samples by their task)")
        context = int(llm_config(cfg.model.llm, cfg.context.rope).max_position_embeddings)
        if cfg.data.seq_len is not None and cfg.data.seq_len + cfg.rl.max_new_tokens > context:
            raise ConfigError(
                f"data.seq_len={cfg.data.seq_len} (the longest prompt) + rl.max_new_tokens="
                f"{cfg.rl.max_new_tokens} exceeds the model's context of {context} tokens"
            )
        if cfg.rl.beta > 0 and not (cfg.rl.reference or cfg.init_from):
            raise ConfigError("rl.beta > 0 needs a reference policy: set rl.reference or init_from")
        from lit_bluelm.objectives.grpo import uses_learned
        from lit_bluelm.rewards.router import check_names

        check_names(cfg.rewards.routes)
        check_prompts(cfg)
        if uses_learned(cfg.rewards.routes):
            from lit_bluelm.rewards.model import RewardModel

            RewardModel.check_run(cfg.rewards.model, tokenizer)  # its config and tokenizer, no weights

    def setup(self, stage: str) -> None:
        from lit_bluelm.tokenizer import load_tokenizer

        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.cfg.tokenizer.path)

    def _build_router(self) -> Any:
        if self._router is None:
            from lit_bluelm.objectives.grpo import uses_learned
            from lit_bluelm.rewards.router import RewardRouter

            learned = None
            if uses_learned(self.cfg.rewards.routes):
                from lit_bluelm.rewards.model import RewardModel

                model = RewardModel.from_run(
                    self.cfg.rewards.model, tokenizer=self._tokenizer, device=self.device
                )

                def learned(items: List[Any]) -> List[float]:
                    return model.score([c for c, _ in items], [imgs for _, imgs in items])

            self._router = RewardRouter(self.cfg.rewards, learned)
        return self._router

    def configure_model(self) -> None:
        super().configure_model()
        if self.cfg.rl.beta > 0 and not self._reference:
            from lit_bluelm.checkpoint import load_model_weights
            from lit_bluelm.models import build_model

            reference = build_model(self.cfg.model, self.cfg.context)
            load_model_weights(reference, self.cfg.rl.reference or self.cfg.init_from, "rl.reference")
            reference.requires_grad_(False).eval()
            self._reference.append(reference)

    def on_fit_start(self) -> None:
        for ref in self._reference:
            ref.to(self.device)

    def on_validation_start(self) -> None:
        self.on_fit_start()

    def teardown(self, stage: str) -> None:
        if self._router is not None:
            self._router.close()

    # ------------------------------------------------------------------ rollouts

    def _engine(self) -> Any:
        from lit_bluelm.generation import Generator

        if self._generator is None:
            fsdp = self.cfg.trainer.strategy == "fsdp"
            self._generator = Generator(self.model, self._tokenizer, fast=not fsdp, lockstep=fsdp)
        return self._generator

    def _generate(self, rows: List[Any], gen_cfg: Any) -> List[Any]:
        """The engine on ``rows``. Under FSDP the root's own weights (embeddings, norm, head),
        which only its forward would gather, are gathered around the whole rollout (documented
        ``FSDPModule.unshard``/``reshard``); the layers gather per step, every rank in lockstep."""
        fsdp = self.cfg.trainer.strategy == "fsdp"
        if fsdp:
            if not self._fsdp_ready:
                # FSDP2 sets itself up on the root's first forward; the rollout calls the
                # decoder directly, so the root runs once first (one token, no output)
                with torch.no_grad():
                    one = torch.zeros(1, 1, dtype=torch.long, device=self.device)
                    self.model(one, head_fn=lambda hidden, head: None)
                self._fsdp_ready = True
            self.model.unshard()
        try:
            return self._engine().generate(rows, gen_cfg)
        finally:
            if fsdp:
                self.model.reshard()

    def rollout(self, prompts: List[Dict[str, Any]], samples: int, seed: int) -> Rollout:
        """``samples`` completions of each prompt, scored."""
        from lit_bluelm.generation import GenerationConfig, Prompt
        from lit_bluelm.rewards.rules import Sample

        rl = self.cfg.rl
        gen_cfg = GenerationConfig(
            max_new_tokens=rl.max_new_tokens,
            temperature=rl.temperature,
            top_p=rl.top_p,
            top_k=rl.top_k,
            seed=seed,
            thinking_budget=rl.thinking_budget,
        )
        rows, modes, pixels = [], [], []
        for p in prompts:
            mode = mode_of(str(p.get("key", "")), list(rl.think))
            for _ in range(samples):
                rows.append(Prompt(p["ids"][mode], p.get("pixel_values")))
                modes.append(mode)
                pixels.append(p.get("pixel_values"))
        generations = self._generate(rows, gen_cfg)
        items, learned_inputs = [], []
        for k, g in enumerate(generations):
            p = prompts[k // samples]
            items.append(
                Sample(
                    task=p["task"],
                    completion=g.text,
                    think=modes[k] == "think",
                    answer_gold=p.get("answer"),
                    tokens=len(g.token_ids),
                    max_new_tokens=rl.max_new_tokens,
                    finish_reason=g.finish_reason,
                )
            )
            reply = {"role": "assistant", "content": g.answer}
            if g.thinking is not None:
                reply["thinking"] = g.thinking
            learned_inputs.append(([*p["messages"], reply], list(p.get("images") or ())))
        scores = self._build_router().score(items, learned_inputs)
        rewards = torch.tensor(scores.rewards, dtype=torch.float32).view(len(prompts), samples)
        return Rollout(
            prompt_ids=[r.input_ids for r in rows],
            generations=generations,
            pixel_values=pixels,
            rewards=rewards,
            scores=scores,
            tasks=[i.task for i in items],
            groups=len(prompts),
            samples=samples,
        )

    def rollout_seed(self, batch_idx: int, validation: bool = False) -> int:
        """A function of the run's seed, the optimizer step, the accumulation index and the rank
        (validation: of the batch index only, so every validation samples alike)."""
        accumulate = self.cfg.trainer.accumulate_grad_batches
        parts = (
            (self.cfg.seed, -1, batch_idx, self.global_rank)
            if validation
            else (self.cfg.seed, self.global_step, batch_idx % accumulate, self.global_rank)
        )
        return zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF

    # ------------------------------------------------------------------ learning

    def policy_loss(self, rollout: Rollout, advantages: torch.Tensor, scored: torch.Tensor) -> tuple:
        """(loss, summed statistics of ``objectives.grpo.STATS``) of one rollout."""
        from lit_bluelm.objectives.token_logprobs import per_token_loss, token_logprobs

        rl, device = self.cfg.rl, self.device
        rows = range(len(rollout.generations))
        lengths = [len(rollout.prompt_ids[k]) + len(rollout.generations[k].token_ids) for k in rows]
        width = max(lengths)
        pad = self._tokenizer.pad_token_id if self._tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(lengths), width), pad, dtype=torch.long)
        row_idx, col_idx, targets, weights, adv = [], [], [], [], []
        flat_adv, flat_scored = advantages.flatten().tolist(), scored.flatten().tolist()
        for k in rows:
            prompt, g = rollout.prompt_ids[k], rollout.generations[k]
            ids = prompt + g.token_ids
            input_ids[k, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            n = len(prompt)
            for t, (token, forced) in enumerate(zip(g.token_ids, g.forced, strict=True)):
                row_idx.append(k)
                col_idx.append(n + t - 1)  # the hidden state that predicts token t
                targets.append(token)
                weights.append(0.0 if forced or not flat_scored[k] else 1.0)
                adv.append(flat_adv[k])
        to = dict(device=device)
        row_t, col_t = torch.tensor(row_idx, **to), torch.tensor(col_idx, **to)
        targets_t = torch.tensor(targets, dtype=torch.long, **to)
        weights_t, adv_t = torch.tensor(weights, **to), torch.tensor(adv, **to)
        tiles = [p for p in rollout.pixel_values if p is not None]
        pixel_values = torch.cat(tiles).to(device) if tiles else None
        input_ids = input_ids.to(device)
        ref = None
        if rl.beta > 0:
            reference = self._reference[0]
            with torch.no_grad():
                ref = reference(
                    input_ids,
                    pixel_values=pixel_values,
                    head_fn=lambda h, head: (
                        token_logprobs(h[row_t, col_t], head, targets_t, rl.temperature).logprobs
                    ),
                )
        fn = surrogate_fn(None, adv_t, weights_t, rl.epsilon_low, rl.epsilon_high, rl.beta, ref)
        tokens = float(weights_t.sum())

        def head_fn(hidden: torch.Tensor, head: nn.Linear):
            return per_token_loss(
                hidden[row_t, col_t],
                head,
                targets_t,
                fn,
                temperature=rl.temperature,
                entropy=True,
                combine=lambda stats: token_mean(stats, tokens),
            )

        return self.model(input_ids, pixel_values=pixel_values, head_fn=head_fn)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        start = time.perf_counter()
        rollout = self.rollout(batch["prompts"], self.cfg.rl.num_generations, self.rollout_seed(batch_idx))
        rolled = time.perf_counter()
        adv = group_advantages(rollout.rewards, self.cfg.rl.scale)
        loss, stats = self.policy_loss(rollout, adv.advantages, adv.scored)
        learned = time.perf_counter()
        self._log_rollout(rollout, adv)
        self._record(rollout)
        means = stat_means(stats)
        n = rollout.groups
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        for name in ("kl", "entropy", "clip_low", "clip_high"):
            self.log(f"train/{name}", means[name], batch_size=n)
        self.log("time/rollout_s", rolled - start, batch_size=n)
        self.log("time/learn_s", learned - rolled, batch_size=n)  # the forward; backward follows
        return loss

    def _log_rollout(self, rollout: Rollout, adv: Any) -> None:
        n = rollout.groups
        rewards = rollout.rewards[adv.scored]
        if rewards.numel():
            self.log("train/reward", rewards.mean(), prog_bar=True, batch_size=n)
            self.log("train/reward_std", rewards.std(unbiased=False), batch_size=n)
        scores = rollout.scores
        for name, values in scores.by_fn.items():
            got = [v for v in values if v is not None]
            if got:
                self.log(f"reward/fn/{name}", sum(got) / len(got), batch_size=n)
        flat = rollout.rewards.flatten().tolist()
        for task in sorted(set(rollout.tasks)):
            got = [r for r, t in zip(flat, rollout.tasks, strict=True) if t == task and not math.isnan(r)]
            if got:
                self.log(f"reward/task/{task}", sum(got) / len(got), batch_size=n)
        self.log("reward/zero_std_frac", adv.flat.float().mean(), batch_size=n)
        self.log("reward/unscored", float((~adv.scored).sum()), batch_size=n, reduce_fx="sum")
        for name in scores.by_fn:
            self.log(
                f"reward/failures/{name}", float(scores.failures.get(name, 0)), batch_size=n, reduce_fx="sum"
            )
            self.log(
                f"reward/timeouts/{name}", float(scores.timeouts.get(name, 0)), batch_size=n, reduce_fx="sum"
            )
        gens = rollout.generations
        lengths = [len(g.token_ids) for g in gens]
        thinking = [g.thinking_tokens for g in gens]
        self.log("rollout/completion_len_mean", sum(lengths) / len(lengths), batch_size=n)
        self.log("rollout/completion_len_max", float(max(lengths)), batch_size=n, reduce_fx="max")
        self.log("rollout/thinking_len_mean", sum(thinking) / len(thinking), batch_size=n)
        self.log("rollout/thinking_len_max", float(max(thinking)), batch_size=n, reduce_fx="max")
        truncated = sum(g.finish_reason == "length" for g in gens) / len(gens)
        self.log("rollout/truncated_frac", truncated, batch_size=n)
        if scores.unrouted:
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(f"{scores.unrouted} samples of tasks without a route in rewards.routes: no reward")
        for line in scores.errors:
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(f"reward failure: {line}")

    # ------------------------------------------------------------------ the reward trend

    def _record(self, rollout: Rollout) -> None:
        step = self.reward_history.setdefault(int(self.global_step), {})
        for task, reward in zip(rollout.tasks, rollout.rewards.flatten().tolist(), strict=True):
            if not math.isnan(reward):
                total = step.setdefault(task, [0.0, 0.0])
                total[0] += reward
                total[1] += 1

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        checkpoint["rl_reward_history"] = {str(k): v for k, v in self.reward_history.items()}

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        saved = checkpoint.get("rl_reward_history") or {}
        self.reward_history = {int(k): {t: list(v) for t, v in tasks.items()} for k, tasks in saved.items()}

    def reward_trend(self) -> Dict[str, Dict[str, float]]:
        """Each task's mean reward over the first and over the last tenth of the optimizer steps
        (at least one step each; over every rank): ``{"first": {task: mean}, "last": {...}}``."""
        steps = int(self.cfg.trainer.max_steps)
        window = max(1, math.ceil(steps / 10))
        tasks = sorted(self.cfg.rewards.routes)
        out: Dict[str, Dict[str, float]] = {}
        for name, span in (("first", range(0, window)), ("last", range(steps - window, steps))):
            sums = torch.zeros(len(tasks), 2, dtype=torch.float64, device=self.device)
            for step in span:
                for i, task in enumerate(tasks):
                    total = self.reward_history.get(step, {}).get(task)
                    if total is not None:
                        sums[i] += torch.tensor(total, dtype=torch.float64, device=self.device)
            if self.trainer is not None and self.trainer.world_size > 1:
                sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
            out[name] = {
                t: round(float(s / n), 4) for t, (s, n) in zip(tasks, sums.tolist(), strict=True) if n > 0
            }
        return out

    def summary_extra(self) -> Dict[str, Any]:
        trend = self.reward_trend()
        return {"reward_first_by_task": trend["first"], "reward_last_by_task": trend["last"]}

    # ------------------------------------------------------------------ validation

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        rollout = self.rollout(batch["prompts"], self.cfg.rl.val_samples, self.rollout_seed(batch_idx, True))
        rewards = rollout.rewards.flatten().tolist()
        checks = {task: self._answer_check(task) for task in set(rollout.tasks)}
        for k, (task, reward) in enumerate(zip(rollout.tasks, rewards, strict=True)):
            if not math.isnan(reward):
                self.val_metrics["reward"].update(reward)
                if f"reward_{task}" in self.val_task:
                    self.val_task[f"reward_{task}"].update(reward)
            check = checks[task]
            value = rollout.scores.by_fn[check][k] if check is not None else None
            if value is not None:
                self.val_metrics["accuracy"].update(value)
                if f"accuracy_{task}" in self.val_task:
                    self.val_task[f"accuracy_{task}"].update(value)

    def _answer_check(self, task: str) -> Optional[str]:
        return next((r.fn for r in self.cfg.rewards.routes.get(task, ()) if r.fn in ANSWER_CHECKS), None)

    def on_validation_epoch_end(self) -> None:
        metrics = {f"val/{name}": m for name, m in self.val_metrics.items()}
        for key, m in self.val_task.items():
            kind, task = key.split("_", 1)
            metrics[f"val/{kind}/{task}"] = m
        counts = torch.tensor([float(m.update_count) for m in metrics.values()], device=self.device)
        counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        for (name, metric), count in zip(metrics.items(), counts.tolist(), strict=True):
            if count > 0:
                self.log(name, metric.compute(), prog_bar=name == "val/reward", sync_dist=True)
            metric.reset()


PEEK = 32  # prompts of each source's first train and val shard read at start-up


def check_prompts(cfg: Any) -> None:
    """The first prompts of each source declare a routed ``task`` and carry the ``answer`` their
    route's answer checks compare (one line naming the source otherwise). A later prompt of an
    unrouted task gets no reward and is counted (``reward/unscored``), never a stop."""
    from datamodules.readers import peek_meta
    from datamodules.streams import expand_shards

    routes = cfg.rewards.routes
    for name, src in cfg.data.sources.items():
        for split in ("train", "val"):
            pattern = src.get(split)
            if not pattern:
                continue
            url = expand_shards(pattern, f"data.sources.{name}.{split}")[0]
            if "://" in url:
                continue  # remote shards are not opened at start-up
            for i, meta in enumerate(peek_meta(url, PEEK)):
                where = f"data.sources.{name}.{split}: sample {i} of {url}"
                task = meta.get("task")
                if task not in routes:
                    raise ConfigError(
                        f"{where}: task {task!r} has no route in rewards.routes (routed: {', '.join(routes)})"
                    )
                checks = [r.fn for r in routes[task] if r.fn in ANSWER_CHECKS]
                if checks and not isinstance(meta.get("answer"), str):
                    raise ConfigError(
                        f"{where}: no 'answer', which rewards.routes.{task} compares ({', '.join(checks)})"
                    )
