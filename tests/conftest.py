"""Shared fixtures: a small demo dataset (written once per session). Helpers live in helpers.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # train.py lives at the repository root
    sys.path.insert(0, str(ROOT))

from datamodules.demo import write_demo  # noqa: E402
from tests.helpers import SMALL  # noqa: E402


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    return write_demo(tmp_path_factory.mktemp("data") / "demo", SMALL)
