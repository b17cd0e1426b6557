"""AnyRes tiling (LLaVA-NeXT style): pick the best grid of square tiles for an image, keep its
aspect ratio, split it into tiles and add a thumbnail of the whole image; and the token count
of a tile. Image arithmetic only (no model code), shared by the processor and the model."""

from __future__ import annotations

import math
from typing import List, Tuple

import numpy as np
import torch
from PIL import Image

# SigLIP normalisation: pixels in [0, 1] -> [-1, 1]
IMAGE_MEAN = 0.5
IMAGE_STD = 0.5


def tokens_per_tile(grid_size: int, downsample: int) -> int:
    """LLM tokens one tile becomes: a grid x grid patch map, padded to a multiple of
    ``downsample`` and merged ``downsample`` x ``downsample`` (27x27 -> 28x28 -> 14x14 = 196)."""
    side = math.ceil(grid_size / downsample)
    return side * side


def candidate_grids(max_grid: int, max_tiles: int) -> List[Tuple[int, int]]:
    """All (cols, rows) with 1 <= cols, rows <= max_grid and cols * rows <= max_tiles."""
    return [
        (cols, rows)
        for rows in range(1, max_grid + 1)
        for cols in range(1, max_grid + 1)
        if cols * rows <= max_tiles
    ]


def select_best_grid(width: int, height: int, tile: int, grids: List[Tuple[int, int]]) -> Tuple[int, int]:
    """The grid whose canvas keeps the most of the image's resolution after an aspect-preserving
    resize (never counting upscaling as gain); ties go to the least padded canvas."""
    best, best_key = grids[0], None
    for cols, rows in grids:
        canvas_w, canvas_h = cols * tile, rows * tile
        scale = min(canvas_w / width, canvas_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = canvas_w * canvas_h - effective
        key = (effective, -wasted)
        if best_key is None or key > best_key:
            best, best_key = (cols, rows), key
    return best


def _to_tensor(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image, dtype=np.float32) / 255.0  # [H, W, 3]
    return (torch.from_numpy(array).permute(2, 0, 1) - IMAGE_MEAN) / IMAGE_STD


def resize_and_pad(image: Image.Image, canvas_w: int, canvas_h: int) -> Image.Image:
    """Fit the image into the canvas keeping its aspect ratio, centred on mid-grey."""
    scale = min(canvas_w / image.width, canvas_h / image.height)
    new_w = max(1, min(canvas_w, round(image.width * scale)))
    new_h = max(1, min(canvas_h, round(image.height * scale)))
    resized = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (canvas_w, canvas_h), (127, 127, 127))
    canvas.paste(resized, ((canvas_w - new_w) // 2, (canvas_h - new_h) // 2))
    return canvas


def image_to_tiles(
    image: Image.Image, tile: int, grids: List[Tuple[int, int]], thumbnail: bool = True
) -> torch.Tensor:
    """An RGB image -> normalised tiles [n, 3, tile, tile], row-major, then the thumbnail.

    A 1x1 grid gets no thumbnail: it would repeat the only tile.
    """
    image = image.convert("RGB")
    cols, rows = select_best_grid(image.width, image.height, tile, grids)
    canvas = _to_tensor(resize_and_pad(image, cols * tile, rows * tile))  # [3, rows*t, cols*t]
    tiles = canvas.view(3, rows, tile, cols, tile).permute(1, 3, 0, 2, 4).reshape(-1, 3, tile, tile)
    if thumbnail and cols * rows > 1:
        thumb = _to_tensor(image.resize((tile, tile), Image.Resampling.BICUBIC))
        tiles = torch.cat([tiles, thumb[None]], dim=0)
    return tiles
