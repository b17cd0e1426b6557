"""SFT samples: assistant-only targets token by token, images placed by markers, whole
conversations (too long ones skipped), masks kept by packing."""

import json

import pytest
import torch
import webdataset as wds

from datamodules.kinds import SampleError, Skips, TooLong, encode_chat
from datamodules.packing import join
from datamodules.streams import MixedStream, Source
from lit_bluelm.labels import IGNORE_INDEX
from lit_bluelm.tokenizer import IM_END, IMAGE, THINK_CONTROL
from tests.helpers import png_bytes

THINKING = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 4 + 5 + 3?"},
    {"role": "assistant", "content": "12", "thinking": "4 + 5 = 9\n9 + 3 = 12"},
]


def _sample(messages, **images):
    return {"__key__": "k", "json": json.dumps({"messages": messages}).encode(), **images}


def _pieces(tok, ids, labels):
    """The decoded text of the target tokens and of the others."""
    ids, labels = ids.tolist(), labels.tolist()
    targets = tok.decode([t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX])
    others = tok.decode([t for t, lab in zip(ids, labels, strict=True) if lab == IGNORE_INDEX])
    return targets, others


def test_only_the_assistant_reply_is_a_target_token_by_token(processor):
    ex = encode_chat(_sample(THINKING), processor, seq_len=512)
    tok = processor.tokenizer
    targets, others = _pieces(tok, ex["input_ids"], ex["labels"])
    assert targets == "<think>\n4 + 5 = 9\n9 + 3 = 12\n</think>\n12" + IM_END
    assert THINK_CONTROL in others and "Be brief." in others and "What is 4 + 5 + 3?" in others
    # every target equals its token (labels are shifted by the loss, not here)
    kept = ex["labels"] != IGNORE_INDEX
    assert torch.equal(ex["labels"][kept], ex["input_ids"][kept])
    # the targets are one contiguous run ending at <|im_end|>, before "\n" and EOS
    idx = kept.nonzero().flatten().tolist()
    assert idx == list(range(idx[0], idx[-1] + 1))
    assert ex["input_ids"][idx[-1]] == tok.convert_tokens_to_ids(IM_END)


def test_a_non_thinking_sample_has_no_control_token_and_no_think_block(processor):
    nothink = [m | {} for m in THINKING]
    del nothink[-1]["thinking"]
    ex = encode_chat(_sample(nothink), processor, seq_len=512)
    targets, others = _pieces(processor.tokenizer, ex["input_ids"], ex["labels"])
    assert targets == "12" + IM_END and THINK_CONTROL not in others and "<think>" not in others


def test_images_are_placed_by_markers_in_member_order(processor):
    messages = [
        {"role": "user", "content": f"{IMAGE}\nand\n{IMAGE}\nhow many shapes?"},
        {"role": "assistant", "content": "2"},
    ]
    red, blue = png_bytes((112, 112), (255, 0, 0)), png_bytes((112, 112), (0, 0, 255))
    ex = encode_chat(_sample(messages, **{"1.png": blue, "0.png": red}), processor, seq_len=512)
    assert ex["pixel_values"].shape[0] == 2  # one tile each (1x1 grids, no thumbnail)
    assert ex["pixel_values"][0, 0].mean() > ex["pixel_values"][1, 0].mean()  # red (0.png) first
    image_id = processor.image_token_id
    assert int((ex["input_ids"] == image_id).sum()) == 2 * processor.tokens_per_tile
    assert (ex["labels"][ex["input_ids"] == image_id] == IGNORE_INDEX).all()
    with pytest.raises(SampleError, match="2 <image> markers but 1 images"):
        encode_chat(_sample(messages, png=red), processor, seq_len=512)


def test_a_conversation_longer_than_seq_len_is_skipped_not_split(processor):
    with pytest.raises(TooLong, match="> data.seq_len=16"):
        encode_chat(_sample(THINKING), processor, seq_len=16)


def test_too_long_conversations_are_counted_apart_from_other_skips(tmp_path, processor):
    good = _sample(THINKING)
    long = _sample([{"role": "user", "content": "go on " * 200}, {"role": "assistant", "content": "ok"}])
    with wds.TarWriter(str(tmp_path / "c-0.tar"), encoder=False) as sink:
        for i, sample in enumerate([good, long, {"json": b"not json"}, good, good]):
            sink.write({**sample, "__key__": f"s{i}"})
    src = Source("sft", "chat", [str(tmp_path / "c-0.tar")], 1.0)
    stream = iter(MixedStream([src], processor, seq_len=128, seed=0, train=False))
    examples = [next(stream) for _ in range(3)]
    assert Skips.sum(e["skipped"] for e in examples) == Skips({"too_long": 1, "bad_json": 1})


def test_packing_keeps_the_loss_masks(processor):
    a = encode_chat(_sample(THINKING), processor, seq_len=512)
    nothink = [dict(m) for m in THINKING]
    del nothink[-1]["thinking"]
    b = encode_chat(_sample(nothink), processor, seq_len=512)
    row = join([a, b])
    assert torch.equal(row["labels"], torch.cat([a["labels"], b["labels"]]))  # b starts untrained
    assert row["labels"][len(a["labels"])] == IGNORE_INDEX
