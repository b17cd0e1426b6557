import json

import pytest
import torch
import webdataset as wds
from PIL import Image

from datamodules.collate import Collator
from datamodules.kinds import Skips, encode_image_text, encode_text
from datamodules.streams import MixedStream, Source, expand_shards, reader_shards
from lit_bluelm.config import ConfigError
from lit_bluelm.labels import IGNORE_INDEX
from lit_bluelm.tokenizer import IMAGE, load_tokenizer
from tests.helpers import png_bytes as _png


def test_processor_expands_each_marker_to_its_tiles(processor):
    enc = processor.encode(
        f"a {IMAGE} b {IMAGE}", [Image.new("RGB", (224, 112)), Image.new("RGB", (112, 112))]
    )
    n = enc.input_ids.count(processor.image_token_id)
    assert enc.pixel_values.shape == (3 + 1, 3, 112, 112)  # 2x1 grid + thumbnail, then 1x1
    assert n == 4 * processor.tokens_per_tile == 64
    with pytest.raises(ValueError, match="markers"):
        processor.encode(f"{IMAGE}", [])


def test_tokenizer_has_every_special_token(demo_dir):
    tok = load_tokenizer(demo_dir / "tokenizer")
    for special in ("<image>", "[|BlueThink|]", "<think>", "</think>", "<|im_start|>", "<|im_end|>"):
        ids = tok(special, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, special  # never split
    assert tok.pad_token_id is not None and tok.eos_token_id is not None
    assert tok.pad_token_id != tok.eos_token_id


def test_encoders_mask_image_placeholders_and_keep_long_text_whole(processor):
    ex = encode_image_text({"png": _png(), "txt": b"three shapes"}, processor, seq_len=200)
    img = ex["input_ids"] == processor.image_token_id
    assert img.sum() == 48 and (ex["labels"][img] == IGNORE_INDEX).all()
    assert (ex["labels"][~img] == ex["input_ids"][~img]).all()
    assert ex["input_ids"][-1] == processor.eos_token_id
    text = encode_text({"json": json.dumps({"text": "word " * 300, "task": "t"}).encode()}, processor, 32)
    # kept whole (the stream splits it into seq_len pieces), never cut
    assert len(text["input_ids"]) > 300 and text["input_ids"][-1] == processor.eos_token_id
    assert text["task"] == "t"
    with pytest.raises(ValueError, match="do not fit"):
        encode_image_text({"png": _png(), "txt": b"x"}, processor, seq_len=20)


def test_collator_pads_right_and_concatenates_tiles():
    a = {
        "input_ids": torch.tensor([1, 2, 3]),
        "labels": torch.tensor([-100, 2, 3]),
        "pixel_values": torch.zeros(2, 3, 4, 4),
        "source": "image_text",
        "key": "a",
        "skipped": 1,
    }
    b = {
        "input_ids": torch.tensor([4]),
        "labels": torch.tensor([4]),
        "pixel_values": None,
        "source": "text",
        "key": "b",
        "skipped": Skips(2, 1),  # 2 samples skipped, one of them too long
    }
    batch = Collator(pad_token_id=0, pad_to_multiple=4)([a, b])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0], [4, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3, -100], [4, -100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert batch["pixel_values"].shape == (2, 3, 4, 4)
    assert batch["source"] == ["image_text", "text"] and batch["skipped"].tolist() == [3, 1]


def _write(path, samples):
    with wds.TarWriter(str(path), encoder=False) as sink:
        for s in samples:
            sink.write(s)


def test_corrupt_samples_are_skipped_and_counted(tmp_path, processor):
    good = [{"__key__": f"g{i}", "png": _png(), "txt": b"fine"} for i in range(5)]
    bad = [
        {"__key__": "b0", "png": b"not a png", "txt": b"broken image"},
        {"__key__": "b1", "png": _png()},  # no caption
        {"__key__": "b2", "png": _png(), "txt": b"\xff\xfe bad utf8"},
    ]
    _write(tmp_path / "s-0.tar", good[:2] + bad + good[2:])
    (tmp_path / "s-1.tar").write_bytes(b"this is not a tar file at all" * 10)
    src = Source("it", "image_text", expand_shards(f"{tmp_path}/s-{{0..1}}.tar", "k"), 1.0)
    stream = iter(MixedStream([src], processor, seq_len=128, seed=0, train=False))
    examples = [next(stream) for _ in range(5)]
    assert [e["key"] for e in examples] == ["g0", "g1", "g2", "g3", "g4"]
    # 3 bad samples before g2, then the unreadable shard is counted on the next pass
    assert [e["skipped"] for e in examples] == [Skips(0, 0)] * 2 + [Skips(3, 0)] + [Skips(0, 0)] * 2
    later = [next(stream) for _ in range(5)]
    assert Skips.sum(e["skipped"] for e in later).total >= 1
    assert all(e["key"].startswith("g") for e in later)


def test_a_source_with_only_bad_samples_stops_with_its_name(tmp_path, processor):
    _write(tmp_path / "bad-0.tar", [{"__key__": "x", "png": b"junk", "txt": b"t"}])
    src = Source("junk_source", "image_text", [str(tmp_path / "bad-0.tar")], 1.0)
    with pytest.raises(RuntimeError, match="junk_source"):
        next(iter(MixedStream([src], processor, seq_len=128, seed=0, train=False)))


def test_missing_shards_and_too_few_shards_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="data.sources.x.train"):
        expand_shards(f"{tmp_path}/none-{{0..3}}.tar", "data.sources.x.train")
    assert reader_shards(list("abcd"), 1, 2, True, "k") == ["b", "d"]
    with pytest.raises(ConfigError, match="num_workers"):
        reader_shards(["a"], 0, 2, True, "k")
    assert reader_shards(["a", "b"], 1, 4, False, "k") == ["b", "a"]  # val: every reader reads all


def test_ranks_read_disjoint_shards(demo_dir, processor):
    # (mixture fractions: test_mixture.py, within 2 points)
    def sources():
        return [
            Source(
                "image_text",
                "image_text",
                expand_shards(f"{demo_dir}/train/image_text-{{000000..000003}}.tar", "a"),
                0.6,
            ),
            Source("text", "text", expand_shards(f"{demo_dir}/train/text-{{000000..000003}}.tar", "b"), 0.4),
        ]

    keys = []
    for rank in (0, 1):
        s = iter(
            MixedStream(sources(), processor, seq_len=128, seed=3, rank=rank, world_size=2, shuffle_buffer=16)
        )
        keys.append({next(s)["key"].split("-")[1] for _ in range(40)})
    assert keys[0].isdisjoint(keys[1])  # within an epoch; shards are dealt anew each epoch


def test_dataloader_workers_read_disjoint_shards(demo_dir, processor):
    from torch.utils.data import DataLoader

    urls = expand_shards(f"{demo_dir}/train/text-{{000000..000003}}.tar", "k")
    stream = MixedStream([Source("text", "text", urls, 1.0)], processor, seq_len=64, seed=0, train=False)
    loader = iter(DataLoader(stream, batch_size=None, num_workers=2))
    shards = [next(loader)["key"].split("-")[1] for _ in range(40)]
    # workers take turns: worker 0 reads shards 0 and 2, worker 1 reads 1 and 3
    assert set(shards[0::2]) == {"text0"} and set(shards[1::2]) == {"text1"}


def test_the_data_side_imports_no_model_code():
    import subprocess
    import sys

    from tests.helpers import ROOT

    code = (
        "import sys, datamodules, datamodules.demo, datamodules.datamodule\n"
        "ours = ('open_clip', 'timm', 'lit_bluelm.models', 'lit_bluelm.modules', 'callbacks')\n"
        # transformers' tokenizer code imports its auto mappings; no architecture's modeling file
        "arch = [m for m in sys.modules if m.startswith('transformers.models.') and '.modeling_' in m\n"
        "        and not m.startswith('transformers.models.auto.')]\n"
        "bad = sorted([m for m in sys.modules if m.startswith(ours)] + arch)\n"
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
