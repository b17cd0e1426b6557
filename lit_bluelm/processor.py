"""Text + images -> model inputs: token ids with each ``<image>`` marker expanded to the image's
token count, and the AnyRes tiles of every image (in marker order)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
from omegaconf import DictConfig
from PIL import Image
from transformers import PreTrainedTokenizerBase

from lit_bluelm.anyres import candidate_grids, image_to_tiles, tokens_per_tile
from lit_bluelm.tokenizer import IMAGE


class ImageTooLarge(ValueError):
    """An image with more pixels than the processor's ``max_image_pixels`` (seen from its header)."""


@dataclass
class Encoded:
    input_ids: List[int]
    pixel_values: Optional[torch.Tensor]  # [tiles, 3, S, S] for all images, or None
    trained: Optional[List[bool]] = None  # per id: inside a trained span (when spans were given)


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
        think_position: str = "after_query",
        max_image_pixels: Optional[int] = None,
    ) -> None:
        assert image_size % patch_size == 0, (image_size, patch_size)  # config checks it at start-up
        self.tokenizer = tokenizer
        self.think_position = think_position  # the chat format's control-token placement
        self.image_size = image_size
        self.grids = candidate_grids(max_grid, max_tiles)
        self.thumbnail = thumbnail
        self.tokens_per_tile = tokens_per_tile(image_size // patch_size, downsample)
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE)
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id
        self.max_image_pixels = max_image_pixels  # None: PIL's own limit only (data.max_image_pixels)
        # the largest AnyRes canvas (cols * S, rows * S): no image is ever used at more than this
        self.canvas = (
            max(c for c, _ in self.grids) * image_size,
            max(r for _, r in self.grids) * image_size,
        )

    @classmethod
    def from_config(
        cls,
        tokenizer: PreTrainedTokenizerBase,
        model_cfg: DictConfig,
        think_position: str = "after_query",
        max_image_pixels: Optional[int] = None,
    ) -> BlueLMProcessor:
        """From ``cfg.model`` (and ``cfg.sft.think_token_position``, ``cfg.data.max_image_pixels``)."""
        return cls(
            tokenizer,
            image_size=model_cfg.vision.image_size,
            patch_size=model_cfg.vision.patch_size,
            downsample=model_cfg.adapter.downsample,
            max_grid=model_cfg.anyres.max_grid,
            max_tiles=model_cfg.anyres.max_tiles,
            thumbnail=model_cfg.anyres.thumbnail,
            think_position=think_position,
            max_image_pixels=max_image_pixels,
        )

    def decode_image(self, data: bytes) -> Image.Image:
        """An image file's bytes -> RGB. Its size is checked from the header before any pixel is
        decoded (:class:`ImageTooLarge` above ``max_image_pixels``), and a JPEG larger than the
        AnyRes canvas is decoded at the smallest DCT scale still covering it (PIL ``draft``)."""
        import io
        import warnings

        with warnings.catch_warnings():  # the pixel limit here replaces PIL's bomb warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                img = Image.open(io.BytesIO(data))
            except Image.DecompressionBombError as err:
                raise ImageTooLarge(str(err)) from None
            with img:
                width, height = img.size
                if self.max_image_pixels is not None and width * height > self.max_image_pixels:
                    raise ImageTooLarge(
                        f"a {width}x{height} image ({width * height / 1e6:.1f} MP) > "
                        f"data.max_image_pixels={self.max_image_pixels}"
                    )
                if img.format == "JPEG" and (width > self.canvas[0] or height > self.canvas[1]):
                    img.draft("RGB", self.canvas)
                img.load()
                return img.convert("RGB")

    def tiles(self, image: Image.Image) -> torch.Tensor:
        """AnyRes tiles [n, 3, S, S] of one image."""
        return image_to_tiles(image, self.image_size, self.grids, self.thumbnail)

    def encode(
        self,
        text: str,
        images: Sequence[Image.Image] = (),
        add_eos: bool = False,
        trained_spans: Optional[Sequence[Tuple[int, int]]] = None,
    ) -> Encoded:
        """Tokenize ``text``; the i-th ``<image>`` marker becomes ``tiles_i * tokens_per_tile``
        placeholder ids, so the model can check that features and placeholders agree. With
        ``trained_spans`` ([start, stop) characters of ``text``), ``trained`` marks the ids that
        begin inside one (the chat format's assistant replies)."""
        out = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=trained_spans is not None)
        ids = list(out["input_ids"])
        trained = None
        if trained_spans is not None:
            trained = [any(a <= start < b for a, b in trained_spans) for start, _ in out["offset_mapping"]]
        if add_eos:
            ids.append(self.eos_token_id)
            trained = trained + [False] if trained is not None else None
        n_markers = ids.count(self.image_token_id)
        if n_markers != len(images):
            raise ValueError(f"text has {n_markers} {IMAGE} markers but {len(images)} images were given")
        if not images:
            return Encoded(ids, None, trained)
        tiles = [self.tiles(img) for img in images]
        expanded: List[int] = []
        flags: List[bool] = []
        image_index = 0
        for i, token in enumerate(ids):
            n = 1
            if token == self.image_token_id:
                n = tiles[image_index].shape[0] * self.tokens_per_tile
                image_index += 1
            expanded.extend([token] * n)
            flags.extend([trained[i] if trained is not None else False] * n)
        return Encoded(expanded, torch.cat(tiles, dim=0), flags if trained is not None else None)

    def encode_conversation(
        self, messages: Sequence[dict], images: Sequence[Image.Image] = (), trained: bool = False
    ) -> Encoded:
        """A whole conversation (ending with the reply it trains or scores) in the chat format,
        with this processor's control-token placement, + EOS: what the ``chat`` and
        ``preference`` sample kinds train on and the reward model scores. ``trained`` marks the
        assistant replies' ids (``Encoded.trained``). A malformed message is a ValueError."""
        from lit_bluelm.chat import render

        rendered = render(messages, think_position=self.think_position)
        spans = rendered.trained if trained else None
        return self.encode(rendered.text, images, add_eos=True, trained_spans=spans)


def load_image(path: str | Path) -> Image.Image:
    """An image file as RGB; one that cannot be read or decoded is a ConfigError naming it."""
    from PIL import UnidentifiedImageError

    from lit_bluelm.errors import ConfigError

    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError) as err:
        raise ConfigError(f"image: cannot decode '{path}': {err}") from None
