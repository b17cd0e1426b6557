"""The composed model: vision tower -> adapter -> image features written into the LLM's input
embeddings at the ``<image>`` placeholder positions."""

from __future__ import annotations

from typing import Any, Callable, List, Optional

import torch
import torch.distributed as dist
from torch import nn
from transformers import PreTrainedModel

from lit_bluelm.anyres import tokens_per_tile
from lit_bluelm.models.vision import VisionTower
from lit_bluelm.objectives.reward import last_token_rewards


class BlueLM(nn.Module):
    """``vision`` + ``adapter`` + ``llm`` (+ ``score``); checkpoint keys are ``vision.*``,
    ``adapter.*``, ``llm.*`` (and ``score.weight``).

    ``vision`` and ``adapter`` may be ``None`` for a text-only model (stage 1). ``score`` is the
    reward model's scalar head (``Linear(hidden, 1, bias=False)``, :meth:`reward`), None elsewhere.
    """

    def __init__(
        self,
        vision: Optional[VisionTower],
        adapter: Optional[nn.Module],
        llm: PreTrainedModel,
        image_token_id: int,
        downsample: int = 2,
        score: Optional[nn.Linear] = None,
    ) -> None:
        super().__init__()
        assert (vision is None) == (adapter is None), "vision and adapter come together"
        self.vision = vision
        self.adapter = adapter
        self.llm = llm
        self.score = score
        self.image_token_id = image_token_id
        self.tokens_per_tile = tokens_per_tile(vision.grid_size, downsample) if vision is not None else 0

    # ------------------------------------------------------------------ structure

    def decoder_layers(self) -> List[nn.Module]:
        """The LLM's decoder blocks (the classes transformers refuses to split across devices)."""
        names = set(getattr(self.llm, "_no_split_modules", None) or [])
        layers = [m for m in self.llm.modules() if type(m).__name__ in names]
        assert layers, f"no decoder layers found in {type(self.llm).__name__}"
        return layers

    def shard_units(self) -> List[nn.Module]:
        """Modules that each become one FSDP unit: every decoder layer and every vision block."""
        vision_blocks = list(self.vision.blocks) if self.vision is not None else []
        return vision_blocks + self.decoder_layers()

    def enable_activation_checkpointing(self) -> None:
        """Recompute each decoder layer and vision block in backward instead of storing activations."""
        self.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.vision is not None:
            self.vision.trunk.set_grad_checkpointing(True)

    # ------------------------------------------------------------------ forward

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Tiles [N, 3, S, S] -> LLM-space image tokens [N * tokens_per_tile, D]."""
        assert self.vision is not None and self.adapter is not None
        features = self.adapter(self.vision(pixel_values))  # [N, tokens_per_tile, D]
        return features.flatten(0, 1)

    def embed(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Token embeddings [B, T, D] with image features at the placeholder positions."""
        embeds = self.llm.get_input_embeddings()(input_ids)
        placeholders = input_ids == self.image_token_id
        n_slots = int(placeholders.sum())
        if pixel_values is not None and pixel_values.shape[0] > 0:
            if self.vision is None:
                raise ValueError("this model has no vision tower but the batch carries images")
            features = self.encode_images(pixel_values.to(embeds.dtype))
            if features.shape[0] != n_slots:
                raise ValueError(
                    f"image placeholders and image features disagree: {n_slots} <image> tokens in "
                    f"input_ids, but {pixel_values.shape[0]} tiles x {self.tokens_per_tile} = "
                    f"{features.shape[0]} features"
                )
            return embeds.masked_scatter(placeholders.unsqueeze(-1), features.to(embeds.dtype))
        if n_slots:
            raise ValueError(f"input_ids hold {n_slots} <image> placeholders but no pixel_values")
        if self.vision is not None and dist.is_initialized() and dist.get_world_size() > 1:
            # Another rank may have images in its batch: run the tower on one blank tile so every
            # rank issues the same FSDP collectives (and DDP sees every parameter used).
            side = self.vision.image_size
            blank = embeds.new_zeros(1, 3, side, side)
            embeds = embeds + 0.0 * self.encode_images(blank).sum()
        return embeds

    def output_head(self) -> nn.Linear:
        """The LLM's output projection (logits = hidden @ weight.T + bias)."""
        return self.llm.get_output_embeddings()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        pixel_values: Optional[torch.Tensor] = None,
        head_fn: Optional[Callable[[torch.Tensor, nn.Linear], Any]] = None,
    ) -> Any:
        """Next-token logits [B, T, V]; or, with ``head_fn``, ``head_fn(hidden [B, T, D], head)``.

        ``head_fn`` lets a loss consume the final hidden states and the output projection
        without materialising full logits (chunked CE/KD). It runs inside this forward, so under
        FSDP the head's weight is gathered while it is used. Packed rows pass ``position_ids``
        that restart at every document and no ``attention_mask``: transformers then builds a
        block-diagonal causal mask from the position resets (SDPA, eager).
        """
        embeds = self.embed(input_ids, pixel_values)
        kwargs = dict(attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        if head_fn is None:
            return self.llm(inputs_embeds=embeds, **kwargs).logits
        hidden = self.llm.base_model(inputs_embeds=embeds, **kwargs).last_hidden_state
        return head_fn(hidden, self.output_head())

    def reward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """[B] scalar rewards, read by ``score`` at each row's last real token (``attention_mask``
        1). Right-padded rows need no mask inside the model (causal attention: a pad never
        reaches an earlier token), so SDPA keeps its causal fast path; left-padded rows pass the
        mask and positions that start at their first real token. It runs through ``forward``
        (``head_fn``), so FSDP gathers the head with the other root weights."""
        if self.score is None:
            raise ValueError("this model has no reward head (model.reward_head: false)")
        mask = attention_mask.bool()
        mask_kwargs: dict = {}
        if bool((~mask[:, 0]).any()):  # left padding
            mask_kwargs = dict(
                attention_mask=attention_mask, position_ids=(mask.long().cumsum(1) - 1).clamp(min=0)
            )

        def head_fn(hidden: torch.Tensor, _lm_head: nn.Linear) -> torch.Tensor:
            return last_token_rewards(hidden, attention_mask, self.score)

        return self(input_ids, pixel_values=pixel_values, head_fn=head_fn, **mask_kwargs)
