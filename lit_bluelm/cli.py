"""What the ``python -m lit_bluelm.<verb>`` entry points (and ``train.py``) share: ``key=value``
arguments parsed into a dataclass, and the convention that a user error is one line on stderr
and exit code 2."""

from __future__ import annotations

import sys
from typing import Callable, Optional, Sequence, Type, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lit_bluelm.errors import ConfigError, RunError

T = TypeVar("T")


def parse_key_values(schema: Type[T], argv: Sequence[str], text_keys: Sequence[str] = ()) -> T:
    """``key=value`` arguments as an instance of the dataclass ``schema``. Values are YAML
    (``budgets=[0,8]``), except those of ``text_keys``, which are free text taken as written (a
    prompt like ``Colour: red?`` is not YAML). An unknown key or a wrong type is a ConfigError."""
    bad = [a for a in argv if "=" not in a]
    if bad:
        raise ConfigError(f"arguments are key=value, got '{bad[0]}'")
    text = {k: v for k, _, v in (a.partition("=") for a in argv) if k in text_keys}
    rest = [a for a in argv if a.partition("=")[0] not in text_keys]
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.from_dotlist(rest), text)
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(str(err).splitlines()[0]) from None


def run_main(
    body: Callable[[list], Optional[int]], usage: Callable[[], str], argv: Optional[Sequence[str]] = None
) -> int:
    """Run ``body(argv)`` as a command; its exit code is what ``body`` returns (None: 0).
    ``-h``/``--help``/``help`` prints ``usage()``; a ConfigError is printed as ``error: ...`` on
    stderr with exit code 2, a RunError the same way with exit code 1."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help", "help") for a in argv):
        print(usage())
        return 0
    try:
        code = body(argv)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RunError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return code or 0
