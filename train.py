"""Train one stage of the BlueLM pipeline.

    python train.py stage=joint [model=tiny] [key=value ...]

Arguments are ``key=value`` overrides of the config (see README, "Config reference"):
``stage=`` and ``model=`` pick ``configs/stage/<stage>.yaml`` and ``configs/model/<model>.yaml``;
``dry_run=true`` prints the resolved config and the parameter table without training.
Prints ``run_dir=``, then at the end ``val_loss_before=``, ``val_loss_after=``, ``global_step=``,
``last_ckpt=``, ``best_ckpt=``, ``on_exception_ckpt=`` (when written), ``train_seconds=`` and
``status=`` (also in ``<run_dir>/summary.json``). Exit codes: ok 0, failed 1, config error 2,
diverged 3, interrupted (SIGINT) 130, preempted (SIGTERM) 143; ``resume_from=auto`` continues
from the newest checkpoint of ``run_dir`` (or starts fresh), so a requeued job reruns the same
command.
"""

from __future__ import annotations

import sys
from typing import Any, Dict, Optional, Sequence

from omegaconf import DictConfig

from lit_bluelm.config import available, load_config


def usage() -> str:
    return f"{__doc__.strip()}\n\nstages: {', '.join(available('stage'))}\nmodels: {', '.join(available('model'))}"


def run(cfg: DictConfig) -> Dict[str, Any]:
    """Train one stage; returns its summary (val losses, checkpoint paths, steps)."""
    from lit_bluelm.trainer import fit_stage

    return fit_stage(cfg)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from lit_bluelm.cli import run_main

    def body(argv: list) -> int:
        cfg = load_config(argv)
        if cfg.dry_run:
            from lit_bluelm.trainer import dry_run

            dry_run(cfg)
            return 0
        from lit_bluelm.status import EXIT_CODES

        return EXIT_CODES[run(cfg)["status"]]

    return run_main(body, usage, argv)


if __name__ == "__main__":
    sys.exit(main())
