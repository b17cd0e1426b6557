"""Config: the schema (``schema.py``), loading (``load.py``) and generic checks (``checks.py``).

An objective's section and its checks live with the objective; see ``schema.py``.
"""

from lit_bluelm.config.checks import PRECISIONS, schedule_step, validate
from lit_bluelm.config.load import (
    CONFIG_ROOT,
    available,
    from_container,
    load_config,
    preset,
    to_container,
)
from lit_bluelm.config.schema import (
    CONFIG_VERSION,
    AdapterConfig,
    Config,
    LLMConfig,
    VisionConfig,
)
from lit_bluelm.errors import ConfigError

__all__ = [
    "CONFIG_ROOT",
    "CONFIG_VERSION",
    "PRECISIONS",
    "AdapterConfig",
    "Config",
    "ConfigError",
    "LLMConfig",
    "VisionConfig",
    "available",
    "from_container",
    "load_config",
    "preset",
    "schedule_step",
    "to_container",
    "validate",
]
