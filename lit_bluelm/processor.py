"""Text + images -> model inputs: token ids with each ``<image>`` marker expanded to the image's
token count, and the AnyRes tiles of every image (in marker order)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
from omegaconf import DictConfig
from PIL import Image
from transformers import PreTrainedTokenizerBase

from lit_bluelm.anyres import candidate_grids, image_to_tiles, tokens_per_tile
from lit_bluelm.tokenizer import IMAGE


@dataclass
class Encoded:
    input_ids: List[int]
    pixel_values: Optional[torch.Tensor]  # [tiles, 3, S, S] for all images, or None


class BlueLMProcessor:
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        image_size: int,
        patch_size: int,
        downsample: int = 2,
        max_grid: int = 4,
        max_tiles: int = 16,
        thumbnail: bool = True,
    ) -> None:
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.grids = candidate_grids(max_grid, max_tiles)
        self.thumbnail = thumbnail
        self.tokens_per_tile = tokens_per_tile(image_size // patch_size, downsample)
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE)
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id

    @classmethod
    def from_config(cls, tokenizer: PreTrainedTokenizerBase, model_cfg: DictConfig) -> BlueLMProcessor:
        return cls(
            tokenizer,
            image_size=model_cfg.vision.image_size,
            patch_size=model_cfg.vision.patch_size,
            downsample=model_cfg.adapter.downsample,
            max_grid=model_cfg.anyres.max_grid,
            max_tiles=model_cfg.anyres.max_tiles,
            thumbnail=model_cfg.anyres.thumbnail,
        )

    def tiles(self, image: Image.Image) -> torch.Tensor:
        """AnyRes tiles [n, 3, S, S] of one image."""
        return image_to_tiles(image, self.image_size, self.grids, self.thumbnail)

    def encode(self, text: str, images: Sequence[Image.Image] = (), add_eos: bool = False) -> Encoded:
        """Tokenize ``text``; the i-th ``<image>`` marker becomes ``tiles_i * tokens_per_tile``
        placeholder ids, so the model can check that features and placeholders agree."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if add_eos:
            ids = ids + [self.eos_token_id]
        n_markers = ids.count(self.image_token_id)
        if n_markers != len(images):
            raise ValueError(f"text has {n_markers} {IMAGE} markers but {len(images)} images were given")
        if not images:
            return Encoded(ids, None)
        tiles = [self.tiles(img) for img in images]
        out: List[int] = []
        image_index = 0
        for token in ids:
            if token == self.image_token_id:
                out.extend([token] * (tiles[image_index].shape[0] * self.tokens_per_tile))
                image_index += 1
            else:
                out.append(token)
        return Encoded(out, torch.cat(tiles, dim=0))
