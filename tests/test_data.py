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
        "skipped": Skips({"decode": 1, "too_long": 1}),  # 2 samples skipped, one too long
    }
    batch = Collator(pad_token_id=0, pad_to_multiple=4)([a, b])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0], [4, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3, -100], [4, -100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert batch["pixel_values"].shape == (2, 3, 4, 4)
    assert batch["source"] == ["image_text", "text"] and Skips.of(batch["skipped"]) == Skips(
        {"other": 1, "decode": 1, "too_long": 1}
    )


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
    bad_ones = Skips({"decode": 2, "missing_member": 1})  # b0's image, b2's text; b1 has no caption
    assert [e["skipped"] for e in examples] == [Skips()] * 2 + [bad_ones] + [Skips()] * 2
    later = [next(stream) for _ in range(5)]
    assert Skips.sum(e["skipped"] for e in later).counts["tar_error"] >= 1
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


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (a decompression bomb's few bytes)."""
    import struct
    import zlib

    data = bytearray(_png((1, 1)))
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13]))
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def _chat(content: str) -> dict:
    messages = [{"role": "user", "content": content}, {"role": "assistant", "content": "ok"}]
    return {"json": json.dumps({"messages": messages}).encode()}


@pytest.mark.parametrize(
    "kind, raw, seq_len, reason",
    [
        ("image_text", {"png": b"not a png", "txt": b"a caption"}, 128, "decode"),
        ("image_text", {"png": _png(), "txt": b"\xff\xfe not utf-8"}, 128, "decode"),
        ("image_text", {"png": _png(), "json": b"{not json"}, 128, "bad_json"),
        ("text", {"json": b"[1, 2]"}, 128, "bad_json"),
        ("cot", {"json": b'{"question": "q", "answer": "a"}'}, 128, "bad_json"),
        ("image_text", {"txt": b"a caption without its image"}, 128, "missing_member"),
        ("text", {"json": b'{"title": "no text"}'}, 128, "missing_member"),
        ("image_text", {"png": _png_header(12000, 12000), "txt": b"a bomb"}, 128, "image_too_large"),
        ("image_text", {"png": _png(), "txt": b"a caption"}, 8, "no_room_for_image"),
        ("chat", _chat("go on " * 200), 128, "too_long"),
        ("text", {"txt": f"a text with the {IMAGE} marker".encode()}, 128, "invalid"),
        ("chat", _chat(f"two markers {IMAGE} {IMAGE} and no image"), 128, "invalid"),
    ],
)
def test_every_bad_sample_is_skipped_under_its_reason(processor, kind, raw, seq_len, reason):
    import copy

    from datamodules.kinds import SAMPLE_KINDS, SampleError, skip_reason

    limited = copy.copy(processor)
    limited.max_image_pixels = 64_000_000  # data.max_image_pixels' default
    with pytest.raises(SampleError) as caught:
        SAMPLE_KINDS[kind](raw, limited, seq_len)
    assert skip_reason(caught.value) == reason, caught.value


def test_the_image_limit_is_checked_from_the_header_and_is_configurable(demo_dir, processor):
    from lit_bluelm.processor import BlueLMProcessor, ImageTooLarge

    tok = load_tokenizer(demo_dir / "tokenizer")
    limited = BlueLMProcessor(tok, 112, 14, 2, 2, 4, max_image_pixels=100 * 100)
    assert limited.decode_image(_png((100, 100))).size == (100, 100)
    with pytest.raises(ImageTooLarge, match=r"a 101x100 image .* > data\.max_image_pixels=10000"):
        limited.decode_image(_png((101, 100)))
    # 12000x12000 claimed by 70 bytes: refused without decoding (PIL alone would try 144 MP)
    with pytest.raises(ImageTooLarge):
        processor.__class__(tok, 112, 14, 2, 2, 4, max_image_pixels=64_000_000).decode_image(
            _png_header(12000, 12000)
        )


def test_a_jpeg_larger_than_the_anyres_canvas_is_decoded_reduced(processor):
    import io

    buf = io.BytesIO()
    Image.new("RGB", (4000, 3000), (200, 10, 10)).save(buf, format="JPEG")
    assert processor.canvas == (224, 224)  # a 2x2 grid of 112px tiles
    img = processor.decode_image(buf.getvalue())
    assert img.size == (500, 375)  # the 1/8 DCT scale: the smallest still covering the canvas
    assert img.getpixel((250, 180))[0] > 150
    small = io.BytesIO()
    Image.new("RGB", (200, 150), (200, 10, 10)).save(small, format="JPEG")
    assert processor.decode_image(small.getvalue()).size == (200, 150)  # within the canvas: as is
    assert processor.decode_image(_png((4000, 3000))).size == (4000, 3000)  # PNG has no draft


def test_skips_are_logged_a_few_times_per_reason_with_shard_and_key(caplog):
    from datamodules.kinds import SampleError
    from datamodules.readers import SkipCounter

    counter = SkipCounter()
    for i in range(5):
        counter.skip(f"sample k{i} of shard-000.tar", SampleError("bad bytes", "decode"))
    counter.skip("sample j0 of shard-001.tar", SampleError("not an object", "bad_json"))
    counter.tar_handler(OSError("truncated"))
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == SkipCounter.MAX_WARNINGS + 2
    assert "skipped sample k0 of shard-000.tar (decode)" in warnings[0]
    assert any("sample j0 of shard-001.tar (bad_json)" in w for w in warnings)
    assert counter.take() == Skips({"decode": 5, "bad_json": 1, "tar_error": 1})
    assert counter.take() == Skips()


def test_skip_counts_read_every_saved_form():
    assert Skips.of(3) == Skips({"other": 3})  # the oldest checkpoints: one count
    assert Skips.of([5, 2]) == Skips({"too_long": 2, "other": 3})  # then [total, too_long]
    full = Skips({"decode": 1, "tar_error": 4})
    assert Skips.of(full.as_dict()) == full and Skips.of(torch.tensor(full.as_list())) == full
    assert full.total == 5 and Skips.of({"a_reason_from_the_future": 2}) == Skips({"other": 2})


def _text_shard(path, docs):
    _write(path, [{"__key__": key, "txt": text.encode()} for key, text in docs])


def test_a_long_document_is_drawn_piece_by_piece_and_restores_with_one_encoding(
    tmp_path, processor, monkeypatch
):
    from datamodules.readers import SourceReader

    short = [(f"s{i}", f"short document number {i} .") for i in range(40)]
    _text_shard(tmp_path / "a-0.tar", short)
    book = " ".join(f"word{i % 50}" for i in range(3000))  # many pieces of seq_len tokens
    _text_shard(tmp_path / "b-0.tar", [("book", book)] + [(f"t{i}", f"tail {i} .") for i in range(40)])
    sources = [
        Source("a", "text", [str(tmp_path / "a-0.tar")], 1.0),
        Source("b", "text", [str(tmp_path / "b-0.tar")], 1.0),
    ]

    def stream(resume=None):
        return iter(
            MixedStream(
                sources,
                processor,
                seq_len=32,
                seed=0,
                shuffle_buffer=1,
                packing=True,
                pack_buffer=8,
                resume=resume,
            )
        )

    rows = [next(stream_) for stream_ in [stream()] for _ in range(40)]
    draws = [src for row in rows for src in row["sources"]]
    # the book's pieces are drawn like documents: half of the draws, not every row
    assert abs(draws.count("b") / len(draws) - 0.5) <= 0.05
    assert sum("book" in row["key"] for row in rows) >= 10 and any(
        "book" not in row["key"] for row in rows[20:]
    )
    assert all(len(row["input_ids"]) <= 32 for row in rows)

    # resuming in the middle of the book re-encodes it once, whatever the pieces pending
    cut = 20
    state = rows[cut]["data_state"]
    assert state["state"]["sources"][1]["in_flight"][0][1] == 0  # the book (sample 0 of its shard)
    calls = []
    original = SourceReader._encode
    monkeypatch.setattr(
        SourceReader, "_encode", lambda self, ref, raw: calls.append(ref) or original(self, ref, raw)
    )
    resumed = stream({"consumed": cut + 1, "slots": {0: state["state"]}})
    first = next(resumed)
    restored_refs = calls[:]
    assert restored_refs.count((str(tmp_path / "b-0.tar"), 0)) == 1
    assert len(restored_refs) == len(set(restored_refs))
    again = [first] + [next(resumed) for _ in range(40 - cut - 2)]
    assert [r["input_ids"].tolist() for r in again] == [r["input_ids"].tolist() for r in rows[cut + 1 :]]
