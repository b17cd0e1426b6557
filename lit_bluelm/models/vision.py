"""Vision encoders: SigLIP2-family ViT trunks that return patch tokens (no pooled embedding)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict

import open_clip
import timm
import torch
from open_clip.factory import load_state_dict
from torch import nn

from lit_bluelm.config import ConfigError, VisionConfig


class VisionTower(nn.Module):
    """A timm ViT trunk. ``forward``: pixels [N, 3, S, S] -> patch tokens [N, grid*grid, C]."""

    def __init__(self, trunk: nn.Module) -> None:
        super().__init__()
        self.trunk = trunk
        self.grid_size = int(trunk.patch_embed.grid_size[0])
        self.embed_dim = int(trunk.embed_dim)
        self.image_size = int(trunk.patch_embed.img_size[0])

    @property
    def blocks(self) -> nn.ModuleList:
        """Transformer blocks: the FSDP / activation-checkpointing units."""
        return self.trunk.blocks

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        tokens = self.trunk.forward_features(pixel_values)  # [N, prefix + grid^2, C]
        return tokens[:, self.trunk.num_prefix_tokens :]


def _timm_trunk(name: str, **kwargs) -> nn.Module:
    # num_classes=0 and global_pool="" drop the classifier and the MAP attention-pool head:
    # only the patch tokens feed the adapter.
    return timm.create_model(name, pretrained=False, num_classes=0, global_pool="", **kwargs)


def load_vision_weights(tower: VisionTower, path: str) -> None:
    """Load a local open_clip checkpoint (``visual.trunk.*`` keys) or a timm ViT state dict."""
    if not Path(path).is_file():
        raise ConfigError(f"model.vision.pretrained: no such file '{path}'")
    state = load_state_dict(path, device="cpu")
    prefix = "visual.trunk."
    if any(k.startswith(prefix) for k in state):
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    # the pooling head and classifier are not part of the trunk we keep
    state = {k: v for k, v in state.items() if not k.startswith(("attn_pool.", "head.", "fc_norm."))}
    missing, unexpected = tower.trunk.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"model.vision.pretrained '{path}' does not match the trunk: "
            f"missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}"
        )


def build_siglip2(cfg: VisionConfig) -> VisionTower:
    """open_clip's SigLIP2 trunk (e.g. ``ViT-SO400M-14-SigLIP2-378``), without the text tower."""
    oc_cfg = open_clip.get_model_config(cfg.open_clip_model)
    if oc_cfg is None or "timm_model_name" not in oc_cfg.get("vision_cfg", {}):
        raise ConfigError(
            f"model.vision.open_clip_model: '{cfg.open_clip_model}' is not an open_clip model "
            "with a timm trunk"
        )
    vision_cfg = oc_cfg["vision_cfg"]
    # open_clip's TimmModel builds the trunk at the timm default size; pass it explicitly
    tower = VisionTower(_timm_trunk(vision_cfg["timm_model_name"], img_size=vision_cfg["image_size"]))
    if (tower.image_size, tower.image_size // tower.grid_size) != (cfg.image_size, cfg.patch_size):
        raise ConfigError(
            f"model.vision: {cfg.open_clip_model} uses {tower.image_size}px tiles and patch "
            f"{tower.image_size // tower.grid_size}; set image_size/patch_size to match"
        )
    if cfg.pretrained:
        load_vision_weights(tower, cfg.pretrained)
    return tower


def build_tiny_vit(cfg: VisionConfig) -> VisionTower:
    """The same timm ViT family, scaled down by kwargs (open_clip would ignore ``image_size``)."""
    trunk = _timm_trunk(
        cfg.timm_model,
        img_size=cfg.image_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio,
    )
    tower = VisionTower(trunk)
    if cfg.pretrained:
        load_vision_weights(tower, cfg.pretrained)
    return tower


VISION_ENCODERS: Dict[str, Callable[[VisionConfig], VisionTower]] = {
    "siglip2": build_siglip2,
    "tiny_vit": build_tiny_vit,
}
