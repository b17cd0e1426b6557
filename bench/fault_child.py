"""One training attempt for ``bench/faults.py``: ``train.py`` with test-only fault hooks.

    python bench/fault_child.py TRAIN_ARGS...

The stage module (``next_token``) is replaced by a subclass that, driven by environment
variables (set by the benchmark, never by a user):

- ``FAULT_KEYS``: appends ``{"step", "keys"}`` (the sample keys the step trained on) to this
  JSON-lines file once the step's update is applied;
- ``FAULT_NAN_STEP``: makes the loss non-finite at that global step (every attempt: a data fault
  is deterministic), on every rank or only on rank ``FAULT_NAN_RANK``;
- ``FAULT_OPT_STEP`` with ``FAULT_OPT_MARKER``: raises inside ``optimizer.step`` at that step,
  after changing a weight, once (the marker file records that it happened);
- ``FAULT_SLOW_SAVE``: writes the first checkpoint of the attempt in two halves, touching this
  file and pausing in between, so the benchmark can kill the process mid-write.

The exit status is ``train.py``'s.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import train  # noqa: E402
from lit_bluelm.modules import STAGE_MODULES, NextTokenModule  # noqa: E402


def _int_env(name: str) -> int:
    return int(os.environ.get(name, "-1"))


class FaultyModule(NextTokenModule):
    def training_step(self, batch, batch_idx):
        self._keys = getattr(self, "_keys", []) + list(batch.get("key", []))
        loss = super().training_step(batch, batch_idx)
        rank = _int_env("FAULT_NAN_RANK")
        if self.global_step == _int_env("FAULT_NAN_STEP") and rank in (-1, self.global_rank):
            return loss * float("nan")
        return loss

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        marker = os.environ.get("FAULT_OPT_MARKER")
        if self.global_step == _int_env("FAULT_OPT_STEP") and marker and not Path(marker).exists():
            inner = optimizer.optimizer

            def failing_step(closure=None, **kwargs):
                closure()  # forward, backward, the guard's checks
                with torch.no_grad():
                    inner.param_groups[0]["params"][0].add_(1.0)  # half of an update
                Path(marker).touch()
                raise RuntimeError("injected failure inside optimizer.step")

            inner.step = failing_step
        return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        path = os.environ.get("FAULT_KEYS")
        if path:
            with open(path, "a") as f:
                f.write(json.dumps({"step": self.global_step - 1, "keys": self._keys}) + "\n")
        self._keys = []


def _slow_first_save(marker: str) -> None:
    real = torch.save
    state = {"done": False}

    def save(obj, f, *args, **kwargs):
        if state["done"] or not hasattr(f, "write"):
            return real(obj, f, *args, **kwargs)
        state["done"] = True
        buf = io.BytesIO()
        real(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        Path(marker).touch()  # half of the checkpoint is on disk, under its temporary name
        time.sleep(5.0)
        f.write(data[len(data) // 2 :])

    torch.save = save


if __name__ == "__main__":
    STAGE_MODULES["next_token"] = FaultyModule
    if os.environ.get("FAULT_SLOW_SAVE"):
        _slow_first_save(os.environ["FAULT_SLOW_SAVE"])
    sys.exit(train.main(sys.argv[1:]))
