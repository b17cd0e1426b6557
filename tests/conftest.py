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


@pytest.fixture(scope="session")
def processor(demo_dir):
    """The processor of the tiny preset (112px tiles, 16 tokens each, grids up to 2x2)."""
    from lit_bluelm.processor import BlueLMProcessor
    from lit_bluelm.tokenizer import load_tokenizer

    tok = load_tokenizer(demo_dir / "tokenizer")
    return BlueLMProcessor(tok, image_size=112, patch_size=14, downsample=2, max_grid=2, max_tiles=4)
