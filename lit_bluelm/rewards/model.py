"""A trained reward model (``stage=reward``) served as a batched scoring function.

    from lit_bluelm.rewards import RewardModel
    rm = RewardModel.from_run("runs/demo/reward", tokenizer=policy_tokenizer, device="cuda")
    rm.score([[{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]])

A conversation ends with the assistant reply to score; it is rendered exactly as the reward
model's training pairs were (the chat format of the run's own tokenizer and control-token
placement, + EOS), images by ``<image>`` markers as in chat samples.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional, Sequence

import torch
from PIL import Image

from lit_bluelm.errors import ConfigError

Conversation = Sequence[dict]


def _checkpoint_of(path: str | Path) -> Path:
    """A run folder's chosen checkpoint: its summary's ``best_ckpt`` (the best ``val/accuracy``),
    else ``checkpoints/last.ckpt``; a checkpoint path is taken as it is."""
    import json

    path = Path(path)
    if not (path.is_dir() and (path / "checkpoints").is_dir()):
        return path
    summary = path / "summary.json"
    best = json.loads(summary.read_text()).get("best_ckpt") if summary.is_file() else None
    if best and Path(best).exists():
        return Path(best)
    if (path / "checkpoints" / "last.ckpt").exists():
        return path / "checkpoints" / "last.ckpt"
    raise ConfigError(f"reward model: '{path}' has no checkpoint (checkpoints/last.ckpt)")


def _require_head(loaded: Any) -> None:
    if not loaded.config.model.reward_head:
        raise ConfigError(f"reward model: '{loaded.path}' is not a reward run (model.reward_head: false)")


def _check_policy_tokenizer(loaded: Any, tokenizer: Any) -> None:
    """The reward run's tokenizer and chat template are the policy's (else the policy's text
    would be re-read with other ids or in another format)."""
    from lit_bluelm.tokenizer import tokenizer_difference

    difference = tokenizer_difference(loaded.tokenizer, tokenizer)
    if difference is not None:
        raise ConfigError(
            f"reward model: the tokenizer of '{loaded.path}' differs from the policy's: {difference}"
        )
    ours, theirs = loaded.tokenizer.chat_template, getattr(tokenizer, "chat_template", None)
    if theirs is not None and ours != theirs:
        raise ConfigError(
            f"reward model: the chat template of '{loaded.path}' differs from the policy's "
            "(another chat format or control-token placement, sft.think_token_position)"
        )


class RewardModel:
    """Scores conversations with a reward run's model (``score``: one float each)."""

    def __init__(self, loaded: Any, device: str | torch.device = "cpu", batch_size: int = 32) -> None:
        from lit_bluelm.processor import BlueLMProcessor

        cfg = loaded.config
        _require_head(loaded)
        if batch_size < 1:
            raise ConfigError(f"reward model: batch_size must be >= 1, got {batch_size}")
        self.config = cfg
        self.tokenizer = loaded.tokenizer
        self.path = loaded.path
        self.device = torch.device(device)
        self.model = loaded.model.to(self.device).eval()
        self.batch_size = batch_size
        self.processor = BlueLMProcessor.from_config(self.tokenizer, cfg.model, cfg.sft.think_token_position)
        self.max_length = int(self.model.llm.config.max_position_embeddings)

    @classmethod
    def from_run(
        cls,
        path: str | Path,
        tokenizer: Any = None,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
    ) -> RewardModel:
        """The reward model of a run folder or one of its checkpoints (through ``load_run``).
        With the policy's ``tokenizer``, a reward run whose tokenizer or chat template differs
        from it is refused (the policy's text would be re-read with other ids or another format)."""
        from lit_bluelm.checkpoint import load_run

        loaded = load_run(_checkpoint_of(path), key="reward model")
        if tokenizer is not None:
            _check_policy_tokenizer(loaded, tokenizer)  # before the weights move to ``device``
        return cls(loaded, device, batch_size)

    @staticmethod
    def check_run(path: str | Path, tokenizer: Any) -> None:
        """What :meth:`from_run` with the policy's ``tokenizer`` refuses, read from the run's
        saved config and tokenizer alone (no model is built, no weights are read): a start-up
        check."""
        from lit_bluelm.checkpoint import load_run

        loaded = load_run(_checkpoint_of(path), key="reward model", weights=False)
        _require_head(loaded)
        _check_policy_tokenizer(loaded, tokenizer)

    def encode(self, conversation: Conversation, images: Sequence[Image.Image] = ()) -> Any:
        """One conversation as the reward model reads it (a ValueError says what is wrong)."""
        if not conversation or conversation[-1].get("role") != "assistant":
            raise ValueError("a scored conversation ends with the assistant reply to score")
        encoded = self.processor.encode_conversation(list(conversation), list(images))
        if len(encoded.input_ids) > self.max_length:
            raise ValueError(f"{len(encoded.input_ids)} tokens > the model's context of {self.max_length}")
        return encoded

    @torch.no_grad()
    def score(
        self,
        conversations: Sequence[Conversation],
        images: Optional[Sequence[Sequence[Image.Image]]] = None,
    ) -> List[float]:
        """One reward per conversation, in order (``images[i]``: the i-th conversation's images,
        in marker order). Batches of ``batch_size``, longest first (less padding); a bad
        conversation is a ValueError naming its index, before any scoring."""
        images = images if images is not None else [()] * len(conversations)
        if len(images) != len(conversations):
            raise ValueError(f"{len(conversations)} conversations but {len(images)} image lists")
        encoded = []
        for i, (conversation, imgs) in enumerate(zip(conversations, images, strict=True)):
            try:
                encoded.append(self.encode(conversation, imgs))
            except ValueError as err:
                raise ValueError(f"conversation {i}: {err}") from None
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i].input_ids))
        scores = [0.0] * len(encoded)
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            rewards = self._forward([encoded[i] for i in rows])
            for i, r in zip(rows, rewards.tolist(), strict=True):
                scores[i] = float(r)
        return scores

    def _forward(self, encoded: List[Any]) -> torch.Tensor:
        width = max(len(e.input_ids) for e in encoded)
        pad = self.processor.pad_token_id
        input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, e in enumerate(encoded):  # right padding: the model's causal fast path
            input_ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
            mask[row, : len(e.input_ids)] = 1
        tiles = [e.pixel_values for e in encoded if e.pixel_values is not None]
        pixel_values = torch.cat(tiles).to(self.device) if tiles else None
        return self.model.reward(input_ids.to(self.device), mask.to(self.device), pixel_values)
