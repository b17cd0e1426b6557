"""Loading: dataclass defaults <- ``configs/stage/<stage>.yaml`` <- ``configs/model/<model>.yaml``
<- command-line dotlist (``trainer.max_steps=20 model=bluelm_3b data.mix.text=0.4``).

``stage=<name>`` and ``model=<name>`` (no dot) pick the YAML files; every other argument is an
OmegaConf dotlist entry checked against the schema. Whatever goes wrong (an unknown key, a wrong
type, a YAML syntax error or tag, an interpolation that does not resolve) is a
:class:`ConfigError` naming the key, raised before any data or model work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lit_bluelm.config.checks import validate
from lit_bluelm.config.schema import DEFAULT_MODEL, DEFAULT_STAGE, Config
from lit_bluelm.errors import ConfigError

CONFIG_ROOT = Path(__file__).resolve().parent.parent.parent / "configs"
# what a stage owns: a preset (an architecture) may not set these, so it can never undo them
STAGE_OWNED = ("model.text_only", "model.reward_head")
ROPE_SCALING_KEYS = ("rope_type", "factor", "original_max_position_embeddings")


def available(kind: str) -> List[str]:
    """Names of the shipped ``configs/<kind>/*.yaml`` files."""
    return sorted(p.stem for p in (CONFIG_ROOT / kind).glob("*.yaml"))


def _yaml(kind: str, name: str) -> DictConfig:
    path = CONFIG_ROOT / kind / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown {kind} '{name}'; valid: {', '.join(available(kind))}")
    try:
        loaded = OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException) as err:
        raise ConfigError(f"{path}: {_first_line(err)}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path}: expected a mapping of keys")
    return loaded


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _explain(err: OmegaConfBaseException, source: str, key: str = "?") -> ConfigError:
    key = getattr(err, "full_key", None) or key
    return ConfigError(f"bad config key '{key}' ({source}): {_first_line(err)}")


def _merge(base: DictConfig, other: Any, source: str, key: str = "?") -> DictConfig:
    try:
        merged = OmegaConf.merge(base, other)
    except OmegaConfBaseException as err:
        raise _explain(err, source, key) from None
    except TypeError as err:  # OmegaConf: a list given where the schema has a mapping, or back
        raise ConfigError(f"bad config key '{key}' ({source}): {_first_line(err)}") from None
    assert isinstance(merged, DictConfig)
    return merged


def _check_preset(model_yaml: DictConfig, name: str) -> None:
    """A preset describes an architecture: the model section only, and no stage-owned key."""
    source = f"configs/model/{name}.yaml"
    if set(model_yaml) != {"model"}:
        # training settings belong to the stage yaml, so a preset can never undo them
        extra = sorted(set(model_yaml) - {"model"})
        raise ConfigError(f"{source} may only set 'model', not {extra}")
    try:
        OmegaConf.resolve(model_yaml)
    except OmegaConfBaseException as err:
        raise _explain(err, source) from None
    for key in STAGE_OWNED:
        if OmegaConf.select(model_yaml, key) is not None:
            raise ConfigError(f"{source} sets {key}, which belongs to the stage (stage yaml or command line)")
    rope = OmegaConf.select(model_yaml, "model.llm.config.rope_parameters") or {}
    scaled = [k for k in ROPE_SCALING_KEYS if k in rope and not (k == "rope_type" and rope[k] == "default")]
    if scaled:
        raise ConfigError(
            f"{source} sets rope_parameters {scaled}: context scaling belongs to the stage "
            "(context.rope); a preset keeps rope_theta and max_position_embeddings only"
        )


def _split_argv(argv: Sequence[str]) -> tuple[str, str, List[str]]:
    stage, model, dotlist = DEFAULT_STAGE, DEFAULT_MODEL, []
    for arg in argv:
        if "=" not in arg:
            raise ConfigError(f"arguments are key=value, got '{arg}' (try: python train.py --help)")
        key, value = arg.split("=", 1)
        if key == "stage":
            stage = value
        elif key == "model":
            model = value
        elif key == "model.name":
            raise ConfigError("model.name is set by model=<preset> (a configs/model yaml)")
        else:
            dotlist.append(arg)
    return stage, model, dotlist


def _merge_cli(cfg: DictConfig, dotlist: Sequence[str]) -> DictConfig:
    for arg in dotlist:  # one at a time, so an error names its key
        key = arg.split("=", 1)[0]
        try:
            cli = OmegaConf.from_dotlist([arg])
        except OmegaConfBaseException as err:
            raise _explain(err, "command line", key) from None
        except yaml.YAMLError as err:  # a syntax error or a tag in the value
            raise ConfigError(f"bad config key '{key}' (command line): {_first_line(err)}") from None
        cfg = _merge(cfg, cli, "command line", key)
    return cfg


def _resolve(cfg: DictConfig) -> DictConfig:
    """Every interpolation resolved now, so a bad one fails here and not deep inside a run."""
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:
        raise _explain(err, "interpolation") from None
    return cfg


def load_config(argv: Sequence[str] = ()) -> DictConfig:
    """Build the resolved, validated config from ``key=value`` arguments. What its paths hold
    (checkpoints, a teacher, weights files) is read at start-up: ``lit_bluelm.startup``."""
    stage, model, dotlist = _split_argv(argv)
    cfg = OmegaConf.structured(Config)
    cfg = _merge(cfg, _yaml("stage", stage), f"configs/stage/{stage}.yaml")
    model_yaml = _yaml("model", model)
    _check_preset(model_yaml, model)
    cfg = _merge(cfg, model_yaml, f"configs/model/{model}.yaml")
    cfg = _merge_cli(cfg, dotlist)
    cfg.stage, cfg.model.name = stage, model  # before resolving: ${stage} may be interpolated
    cfg = _resolve(cfg)
    validate(cfg)
    return cfg


def to_container(cfg: DictConfig) -> Dict[str, Any]:
    """Plain dict (for checkpoints: a DictConfig does not load with ``weights_only=True``)."""
    container = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(container, dict)
    return container  # type: ignore[return-value]


def from_container(data: Dict[str, Any], source: str = "checkpoint") -> DictConfig:
    """Schema-checked config from a plain dict (e.g. a checkpoint's hyper-parameters)."""
    return _merge(OmegaConf.structured(Config), data, source)


def preset(name: str) -> DictConfig:
    """The ``model`` section of a shipped preset, over the schema defaults (no stage applied)."""
    model_yaml = _yaml("model", name)
    _check_preset(model_yaml, name)
    cfg = _merge(OmegaConf.structured(Config), model_yaml, f"configs/model/{name}.yaml")
    cfg.model.name = name
    return cfg.model
