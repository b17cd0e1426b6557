"""A run's ``summary.json`` (written at the end of every ``train.py`` run) and comparing runs by it.

    python -m lit_bluelm.summary RUN_DIR [RUN_DIR ...] [--better RUN_A RUN_B]

Prints one row per run (stage, objective, steps, validation loss before and after training).
``--better A B`` also checks that run A ended with a lower ``val/loss`` than run B and exits 1
when it did not (``make demo`` uses it: the distilled student must beat the one trained from
scratch).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

SUMMARY_FILE = "summary.json"


def write_json(path: str | Path, record: Dict[str, Any]) -> Path:
    """``record`` as ``path``, replaced whole (a temporary file beside it, then a rename), so a
    reader never sees half a file: the run records (summary.json, results.json, report.json)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)
    return path


def write_summary(run_dir: str | Path, record: Dict[str, Any]) -> Path:
    """Write ``<run_dir>/summary.json`` (what ``load_summary`` and ``main`` read)."""
    return write_json(Path(run_dir) / SUMMARY_FILE, record)


def print_summary(summary: Dict[str, Any]) -> None:
    """The closing ``key=value`` lines of a run (floats to 4 places; unset values and mappings,
    which summary.json holds, left out)."""
    for key, value in summary.items():
        if value is not None and not isinstance(value, dict):
            print(f"{key}={value:.4f}" if isinstance(value, float) else f"{key}={value}", flush=True)


def load_summary(run_dir: str) -> Dict:
    path = Path(run_dir) / SUMMARY_FILE
    if not path.is_file():
        raise SystemExit(f"error: {path} not found (has the run finished?)")
    return json.loads(path.read_text())


def _fmt(value: Optional[float]) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"


def _count(value: Optional[float]) -> str:
    return f"{value:.0f}" if isinstance(value, (int, float)) else "-"


def print_table(runs: List[str]) -> None:
    """One row per run: stage, objective, steps, validation loss before and after (and by source;
    a reward run also its held-out pair accuracy before and after, a GRPO run its held-out reward
    and sampled accuracy)."""
    print(
        f"{'run':<32} {'stage':<8} {'module':<10} {'steps':>6} {'val_loss_before':>16} {'val_loss_after':>15}"
    )
    for run in runs:
        s = load_summary(run)
        print(
            f"{run:<32} {s['stage']:<8} {s['module']:<10} {s['global_step']:>6} "
            f"{_fmt(s.get('val_loss_before')):>16} {_fmt(s.get('val_loss_after')):>15}"
        )
        by_source = s.get("val_loss_after_by_source") or {}
        if len(by_source) > 1:
            print(
                f"{'':<32} val_loss_after by source: "
                + ", ".join(f"{k} {v:.4f}" for k, v in by_source.items())
            )
        if "val_reward_after" in s:  # a GRPO run: held-out rollouts' reward and sampled pass@1
            by_task = s.get("val_reward_after_by_source") or {}
            print(
                f"{'':<32} val_reward {_fmt(s.get('val_reward_before'))} -> {_fmt(s.get('val_reward_after'))}"
                + (
                    " (by task: " + ", ".join(f"{k} {v:.4f}" for k, v in by_task.items()) + ")"
                    if by_task
                    else ""
                )
                + f", val_accuracy {_fmt(s.get('val_accuracy_before'))} -> {_fmt(s.get('val_accuracy_after'))}"
            )
        elif "val_accuracy_after" in s:  # a reward run: held-out pairs ranked right
            by_source = s.get("val_accuracy_after_by_source") or {}
            print(
                f"{'':<32} val_accuracy {_fmt(s.get('val_accuracy_before'))} -> "
                f"{_fmt(s.get('val_accuracy_after'))} on {_count(s.get('val_pairs_after'))} pairs"
                + (
                    " (by source: " + ", ".join(f"{k} {v:.4f}" for k, v in by_source.items()) + ")"
                    if by_source
                    else ""
                )
            )


def check_better(run_a: str, run_b: str) -> bool:
    """Did ``run_a`` end with a lower ``val/loss`` than ``run_b``? Prints the comparison."""
    a, b = (load_summary(r).get("val_loss_after") for r in (run_a, run_b))
    if a is None or b is None:
        print("error: --better needs both runs to have a validation loss", file=sys.stderr)
        return False
    ok = a < b
    print(f"{run_a} val/loss {a:.4f} {'<' if ok else '>='} {run_b} val/loss {b:.4f}")
    if not ok:
        print("error: the first run is not better", file=sys.stderr)
    return ok


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", help="run directories")
    parser.add_argument("--better", nargs=2, metavar=("RUN_A", "RUN_B"), help="require A's val loss < B's")
    args = parser.parse_args(argv)
    print_table(args.runs)
    if args.better and not check_better(*args.better):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
