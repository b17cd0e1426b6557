"""Vision -> LLM adapters: 2x2 spatial downsampling then a 2-layer MLP (BlueLM-2.5)."""

from __future__ import annotations

import math
from typing import Callable, Dict

import torch
import torch.nn.functional as F
from torch import nn

from lit_bluelm.config import AdapterConfig


class MLPAdapter(nn.Module):
    """Patch tokens [N, g*g, C] -> LLM embeddings [N, ceil(g/d)^2, D].

    Pads the g x g grid to a multiple of d, folds each d x d neighbourhood into the channel
    dimension (space-to-depth, C -> d*d*C), then LayerNorm, Linear, GELU, Linear.
    """

    def __init__(self, in_dim: int, out_dim: int, downsample: int = 2, hidden_size: int | None = None):
        super().__init__()
        self.downsample = downsample
        merged = in_dim * downsample * downsample
        hidden = hidden_size or out_dim
        self.norm = nn.LayerNorm(merged)
        self.fc1 = nn.Linear(merged, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out_dim)

    def space_to_depth(self, x: torch.Tensor) -> torch.Tensor:
        n, length, c = x.shape
        g = math.isqrt(length)
        assert g * g == length, f"patch tokens must form a square grid, got {length}"
        d = self.downsample
        x = x.view(n, g, g, c)
        pad = (-g) % d
        if pad:  # pad right and bottom: F.pad takes (C, W, H) pairs from the last dim
            x = F.pad(x, (0, 0, 0, pad, 0, pad))
        s = (g + pad) // d
        x = x.view(n, s, d, s, d, c).permute(0, 1, 3, 2, 4, 5)  # [N, s, s, d, d, C]
        return x.reshape(n, s * s, d * d * c)

    def forward(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        x = self.space_to_depth(patch_tokens)
        return self.fc2(self.act(self.fc1(self.norm(x))))


def build_mlp2x2(cfg: AdapterConfig, in_dim: int, out_dim: int) -> MLPAdapter:
    return MLPAdapter(in_dim, out_dim, downsample=cfg.downsample, hidden_size=cfg.hidden_size)


ADAPTERS: Dict[str, Callable[[AdapterConfig, int, int], nn.Module]] = {"mlp2x2": build_mlp2x2}
