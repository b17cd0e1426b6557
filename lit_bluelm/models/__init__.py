"""Plain ``nn.Module``s: no Lightning, no data pipeline. Reused by training, generation, export."""

from lit_bluelm.anyres import tokens_per_tile
from lit_bluelm.models.adapter import ADAPTERS, MLPAdapter
from lit_bluelm.models.bluelm import BlueLM
from lit_bluelm.models.build import build_model, parameter_table
from lit_bluelm.models.llm import LLMS
from lit_bluelm.models.vision import VISION_ENCODERS, VisionTower

__all__ = [
    "ADAPTERS",
    "LLMS",
    "VISION_ENCODERS",
    "BlueLM",
    "MLPAdapter",
    "VisionTower",
    "build_model",
    "parameter_table",
    "tokens_per_tile",
]
