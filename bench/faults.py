"""Fault benchmark: a training run that is killed, preempted, crashed and fed bad data, resumed
each time with ``resume_from=auto``, against an uninterrupted run given the same faults.

    python bench/faults.py [--trials 2] [--seed 0] [--steps 18] [--keep DIR]

Every trial trains the tiny joint stage for ``--steps`` optimizer steps (a checkpoint every 3)
on demo shards plus corrupt ones (a truncated tar, a PNG bomb's header, undecodable images,
pickled and missing members, broken JSON), with a non-finite loss injected at one step. The
faulty run goes through, in a seeded random order and at seeded random steps:

- ``sigkill``: SIGKILL to the process group at a random moment of training;
- ``sigkill_save``: SIGKILL while a checkpoint is half written (``bench/fault_child.py`` pauses
  the write; the torn temporary file must never be taken for a checkpoint);
- ``sigterm``: SIGTERM to the process group (exit 143, ``status=preempted``,
  ``on_exception.ckpt``);
- ``optimizer``: an exception inside ``optimizer.step`` after a weight changed (exit 1, no
  ``on_exception.ckpt``: the run resumes from ``last.ckpt``);

and after each one the same command is run again (``resume_from=auto``) until the run finishes.
The non-finite loss (``nan``) and the corrupt shards (``corrupt_data``) are faults of both runs:
they must cost a skipped step and skipped samples, never the run.

Every step records the sample keys it trained on; for the faulty run, the record of a step
that was trained again after a resume replaces the earlier one, which is what the final
checkpoint's weights saw. A fault is survived when its own check holds (exit status, summary
status, checkpoints) and the trial's final run ends ``ok`` at ``--steps`` with the same keys at
every step as the uninterrupted run.

Last line: ``faults=<survived>/<tried> lost_samples=<n> duplicated_samples=<n>``; exits 1 unless
every fault was survived with nothing lost or duplicated.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Dict, List, Tuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from datamodules.demo import DemoSpec, write_demo  # noqa: E402

SPEC = DemoSpec(train_shards=4, val_shards=2, train_per_shard=48, val_per_shard=16, vocab_size=1024)
CHILD = ROOT / "bench" / "fault_child.py"
KILLS = ("sigkill", "sigkill_save", "sigterm", "optimizer")
EVERY = 3  # checkpoint.every_n_steps


def _tar(path: Path, samples: List[Dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            key = sample.pop("__key__")
            for ext, data in sample.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _png_header(width: int, height: int) -> bytes:
    import struct
    import zlib

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def write_data(root: Path) -> List[str]:
    """Demo shards plus corrupt ones; returns the data overrides of both runs."""
    import pickle

    write_demo(root, SPEC)
    good = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (32, 32), (10, 200, 30)).save(good, format="PNG")
    for shard in sorted((root / "train").glob("image_text-*.tar")):
        # every shard opens with bad samples, so a short run reads some whatever the shard order
        with tarfile.open(shard) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
        tag = shard.stem
        bad_samples = [
            {"__key__": f"{tag}-bomb", "png": _png_header(30000, 30000), "txt": b"a bomb"},
            {"__key__": f"{tag}-junk_png", "png": b"\x89PNG not really", "txt": b"junk"},
            {"__key__": f"{tag}-no_caption", "png": good.getvalue()},
            {"__key__": f"{tag}-pickled", "pyd": pickle.dumps({"x": 1}), "txt": b"pickle"},
            {"__key__": f"{tag}-bad_json", "png": good.getvalue(), "json": b"{oops", "txt": b"x"},
        ]
        _tar(shard, bad_samples)
        with tarfile.open(shard, "a") as tar:
            for member, data in members:
                tar.addfile(member, io.BytesIO(data))
    bad = root / "bad"
    bad.mkdir()
    whole = (root / "train" / "text-000000.tar").read_bytes()
    (bad / "text-000000.tar").write_bytes(whole[: len(whole) // 3])  # truncated mid-member
    t, v = SPEC.train_shards - 1, SPEC.val_shards - 1
    args = [f"tokenizer.path={root}/tokenizer", f"data.demo_dir={root}"]
    for name in ("image_text", "text"):
        train = f"{root}/train/{name}-{{000000..{t:06d}}}.tar"
        args += [
            f"data.sources.{name}.train={train}" + (f"::{bad}/text-000000.tar" if name == "text" else ""),
            f"data.sources.{name}.val={root}/val/{name}-{{000000..{v:06d}}}.tar",
        ]
    return args


def train_args(data: List[str], run_dir: Path, steps: int) -> List[str]:
    return data + [
        f"run_dir={run_dir}",
        "resume_from=auto",
        "validate_before_fit=false",
        "data.batch_size=4",
        "data.num_workers=1",
        "data.seq_len=128",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "trainer.limit_val_batches=1",
        "trainer.log_every_n_steps=1",
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps}",
        f"checkpoint.every_n_steps={EVERY}",
    ]


class Attempt:
    """One child process of a run."""

    def __init__(self, args: List[str], env: Dict[str, str], log: Path) -> None:
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, str(CHILD), *args],
            cwd=ROOT,
            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **env},
            stdout=open(log, "w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a process group, as a scheduler signals it
        )

    def signal_group(self, signum: int) -> None:
        try:
            os.killpg(self.proc.pid, signum)
        except ProcessLookupError:
            pass

    def wait(self, timeout: float = 600) -> int:
        return self.proc.wait(timeout=timeout)


def _records_since(keys_file: Path, offset: int) -> List[int]:
    """The steps recorded after byte ``offset`` of the keys file (by the attempt started there)."""
    if not keys_file.exists():
        return []
    with open(keys_file) as f:
        f.seek(offset)
        return [json.loads(line)["step"] for line in f.read().splitlines() if line.endswith("}")]


def _resume_step(run_dir: Path) -> int:
    """The step the next ``resume_from=auto`` attempt starts from (0: a fresh start)."""
    from lit_bluelm.checkpoint import newest_resumable, read_meta

    path = newest_resumable(run_dir / "checkpoints")
    return int(read_meta(path, "resume_from")["global_step"]) if path is not None else 0


def _wait_for(cond, attempt: Attempt, timeout: float = 300) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        if attempt.proc.poll() is not None:
            return False
        time.sleep(0.01)
    return False


def lineage(keys_file: Path) -> Dict[int, List[str]]:
    """Step -> sample keys; a step trained again after a resume replaces its earlier record."""
    steps: Dict[int, List[str]] = {}
    for line in keys_file.read_text().splitlines():
        if line.endswith("}"):  # a line cut by SIGKILL is not a step
            record = json.loads(line)
            steps[int(record["step"])] = record["keys"]
    return steps


def _summary(run_dir: Path) -> Dict:
    path = run_dir / "summary.json"
    return json.loads(path.read_text()) if path.exists() else {}


def run_trial(
    trial: int, rng: random.Random, data: List[str], work: Path, steps: int
) -> Tuple[int, int, int, int, List[str]]:
    """One faulty run and its reference; returns (survived, tried, lost, duplicated, notes)."""
    nan_step = rng.randrange(1, steps - 1)
    base_env = {"FAULT_NAN_STEP": str(nan_step)}
    notes: List[str] = []

    ref_dir, ref_keys = work / f"t{trial}-reference", work / f"t{trial}-reference.keys"
    ref = Attempt(
        train_args(data, ref_dir, steps), {**base_env, "FAULT_KEYS": str(ref_keys)}, work / "ref.log"
    )
    ref_rc = ref.wait()
    if ref_rc != 0:
        raise SystemExit(f"the uninterrupted run failed (exit {ref_rc}); see {work / 'ref.log'}")

    run_dir, keys = work / f"t{trial}-faulty", work / f"t{trial}-faulty.keys"
    args = train_args(data, run_dir, steps)
    plan = list(KILLS) + ["sigkill"]
    rng.shuffle(plan)
    ok: Dict[str, bool] = {}
    for n, fault in enumerate(plan):
        name = f"{fault}#{n}"
        env = {**base_env, "FAULT_KEYS": str(keys)}
        offset = keys.stat().st_size if keys.exists() else 0
        # a step a little past where this attempt resumes, early enough that it cannot finish
        target = min(steps - 4, _resume_step(run_dir) + rng.randrange(0, 3))
        log = work / f"t{trial}-{n}-{fault}.log"
        started = time.time()
        if fault == "optimizer":
            marker = work / f"t{trial}-{n}.opt"
            env |= {"FAULT_OPT_STEP": str(target), "FAULT_OPT_MARKER": str(marker)}
            attempt = Attempt(args, env, log)
            rc = attempt.wait()
            on_exc = run_dir / "checkpoints" / "on_exception.ckpt"
            fresh_exc = on_exc.exists() and on_exc.stat().st_mtime >= started
            ok[name] = (
                rc == 1 and marker.exists() and _summary(run_dir).get("status") == "failed" and not fresh_exc
            )
        elif fault == "sigkill_save":
            marker = work / f"t{trial}-{n}.saving"
            env |= {"FAULT_SLOW_SAVE": str(marker)}
            attempt = Attempt(args, env, log)
            reached = _wait_for(marker.exists, attempt)
            attempt.signal_group(signal.SIGKILL)
            rc = attempt.wait()
            torn = list((run_dir / "checkpoints").glob("*.tmp"))
            ok[name] = reached and rc == -signal.SIGKILL and bool(torn)  # killed mid-write
        else:
            attempt = Attempt(args, env, log)
            reached = _wait_for(lambda t=target, o=offset: t in _records_since(keys, o), attempt)
            time.sleep(rng.random() * 0.3)  # somewhere inside the next step(s)
            signum = signal.SIGKILL if fault == "sigkill" else signal.SIGTERM
            attempt.signal_group(signum)
            rc = attempt.wait()
            if fault == "sigterm":
                summary = _summary(run_dir)
                ok[name] = (
                    rc == 143
                    and summary.get("status") == "preempted"
                    and bool(summary.get("on_exception_ckpt"))
                    and Path(summary["on_exception_ckpt"]).exists()
                )
            else:
                ok[name] = reached and rc == -signal.SIGKILL
        if not ok[name]:
            notes.append(f"trial {trial}: {name} check failed (exit {rc}); see {log}")

    # resume until it finishes (each fault's aftermath included)
    final_rc, final_log = None, work / f"t{trial}-final.log"
    for _ in range(3):
        final_rc = Attempt(args, {**base_env, "FAULT_KEYS": str(keys)}, final_log).wait()
        if final_rc == 0:
            break
    summary = _summary(run_dir)
    finished = final_rc == 0 and summary.get("status") == "ok" and summary.get("global_step") == steps
    if not finished:
        notes.append(f"trial {trial}: the resumed run did not finish (exit {final_rc}); see {final_log}")
    ref_steps, got_steps = lineage(ref_keys), lineage(keys)
    want = Counter(k for ks in ref_steps.values() for k in ks)
    have = Counter(k for ks in got_steps.values() for k in ks)
    lost = sum((want - have).values())
    duplicated = sum((have - want).values())
    same = ref_steps == got_steps
    if not same:
        bad = sorted(s for s in set(ref_steps) | set(got_steps) if ref_steps.get(s) != got_steps.get(s))
        notes.append(f"trial {trial}: sample keys differ from the uninterrupted run at steps {bad[:10]}")
    ref_summary = _summary(ref_dir)
    # the faults of both runs: a skipped step, skipped samples, and the run goes on
    (run_steps, reasons), (ref_steps_skipped, _) = _skips(run_dir), _skips(ref_dir)
    skipped_ok = ref_summary.get("status") == "ok" and run_steps == ref_steps_skipped >= 1
    corrupt_ok = finished and sum(reasons.values()) > 0
    ok["nan"] = skipped_ok and finished
    ok["corrupt_data"] = corrupt_ok
    notes.append(f"trial {trial}: skipped samples by reason {reasons}")
    if not skipped_ok:
        notes.append(f"trial {trial}: the non-finite step at {nan_step} was not skipped alike in both runs")
    trial_ok = finished and same
    survived = sum(v and trial_ok for v in ok.values())
    return survived, len(ok), lost, duplicated, notes


def _skips(run_dir: Path) -> Tuple[int, Dict[str, int]]:
    """Skipped optimizer steps (-1 without a checkpoint) and skipped samples by reason, as the
    run's ``last.ckpt`` holds them (one read)."""
    import torch

    path = run_dir / "checkpoints" / "last.ckpt"
    if not path.exists():
        return -1, {}
    ckpt = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
    return int(ckpt["callbacks"]["NonFiniteGuard"]["skipped"]), dict(ckpt.get("data_skipped_by_reason", {}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=18)
    parser.add_argument("--keep", type=Path, default=None, help="keep the runs and logs in this folder")
    opts = parser.parse_args()
    if opts.trials < 1 or opts.steps < 8:
        parser.error("--trials must be >= 1 and --steps >= 8")
    work = opts.keep or Path(tempfile.mkdtemp(prefix="faults-"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.time()
    try:
        data = write_data(work / "data")
        rng = random.Random(opts.seed)
        survived = tried = lost = duplicated = 0
        for trial in range(opts.trials):
            s, t, lo, du, notes = run_trial(trial, rng, data, work, opts.steps)
            survived, tried, lost, duplicated = survived + s, tried + t, lost + lo, duplicated + du
            for note in notes:
                print(note, flush=True)
            print(
                f"trial {trial}: {s}/{t} faults survived, lost={lo} duplicated={du} "
                f"({time.time() - start:.0f}s so far)",
                flush=True,
            )
    finally:
        if opts.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"faults={survived}/{tried} lost_samples={lost} duplicated_samples={duplicated}")
    return 0 if survived == tried and lost == 0 and duplicated == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
