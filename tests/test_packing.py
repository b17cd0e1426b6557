from collections import Counter

import pytest
import torch

from datamodules.collate import Collator
from datamodules.kinds import Skips
from datamodules.packing import join, pack_stream, split_stream
from lit_bluelm.config import load_config
from lit_bluelm.labels import IGNORE_INDEX
from lit_bluelm.models import build_model
from lit_bluelm.objectives import next_token_head_loss


def _doc(n: int, start: int = 10, key: str = "") -> dict:
    ids = torch.arange(start, start + n)
    return {"input_ids": ids, "labels": ids.clone(), "pixel_values": None, "key": key, "skipped": 1}


def test_join_restarts_positions_and_drops_the_cross_document_label():
    row = join([_doc(3, key="a"), _doc(2, start=50, key="b")])
    assert row["position_ids"].tolist() == [0, 1, 2, 0, 1]
    assert row["labels"].tolist() == [10, 11, 12, IGNORE_INDEX, 51]
    assert row["key"] == "a+b" and row["skipped"] == Skips({"other": 2}) and row["documents"] == 2


def test_pack_stream_keeps_every_token_and_splits_long_documents():
    lengths = [5, 9, 3, 40, 7, 16, 1, 12, 8]
    docs = [_doc(n, start=100 * i, key=str(i)) for i, n in enumerate(lengths)]
    rows = list(pack_stream(iter(docs), seq_len=16, buffer_size=4))
    assert all(len(r["input_ids"]) <= 16 for r in rows)
    packed = Counter(int(t) for r in rows for t in r["input_ids"])
    assert packed == Counter(int(t) for d in docs for t in d["input_ids"])  # nothing lost, nothing twice
    # the 40-token document became 16 + 16 + 8 pieces, each starting at position 0
    assert sum(len(r["input_ids"]) for r in rows) == sum(lengths)
    starts = [int(t) for r in rows for t, p in zip(r["input_ids"], r["position_ids"], strict=True) if p == 0]
    assert {300, 316, 332} <= set(starts)


def test_split_stream_splits_without_packing():
    pieces = list(split_stream(iter([_doc(10), _doc(3)]), seq_len=4))
    assert [len(p["input_ids"]) for p in pieces] == [4, 4, 2, 3]
    assert [Skips.of(p["skipped"]).total for p in pieces] == [1, 0, 0, 1]  # counted once per document


def test_best_fit_packing_of_short_documents_is_dense():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(8, 60, (3000,), generator=g).tolist()
    rows = list(pack_stream((_doc(n) for n in lengths), seq_len=256, buffer_size=64))
    full = rows[:-20]  # the tail drains the buffer
    efficiency = sum(len(r["input_ids"]) for r in full) / (256 * len(full))
    assert efficiency >= 0.98


def test_collator_pads_position_ids_as_their_own_segment():
    batch = Collator(pad_token_id=0, pad_to_multiple=8)(
        [join([_doc(3), _doc(2)]), _doc(6) | {"position_ids": None}]
    )
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 0, 1, 2]
    assert batch["position_ids"][1].tolist() == [0, 1, 2, 3, 4, 5, 0, 1]
    assert Collator(0)([_doc(3)])["position_ids"] is None


def test_collator_maps_every_token_to_its_document_and_source():
    a, b, c = (_doc(n) | {"source": s} for n, s in ((3, "cot"), (2, "passkey"), (4, "text")))
    batch = Collator(pad_token_id=0, pad_to_multiple=8)([join([a, b]), c])
    assert batch["doc_sources"] == ["cot", "passkey", "text"]
    # row 0: the first document, the second, then its padding (counted for the last one)
    assert batch["documents"].tolist() == [[0, 0, 0, 1, 1, 1, 1, 1], [2, 2, 2, 2, 2, 2, 2, 2]]
    unpacked = Collator(0, pad_to_multiple=1)([a, c])
    assert unpacked["doc_sources"] == ["cot", "text"]
    assert unpacked["documents"].tolist() == [[0, 0, 0, 0], [1, 1, 1, 1]]
    with pytest.raises(ValueError, match="restart 2 times for 3 documents"):
        Collator(0)([join([a, b]) | {"sources": ["cot", "passkey", "text"]}])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_row_matches_documents_run_one_by_one(attn):
    cfg = load_config(["stage=text", f"model.llm.attn_implementation={attn}"]).model
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    docs = [_doc(5, start=3), _doc(7, start=200), _doc(3, start=600)]
    row = join(docs)
    batch = Collator(pad_token_id=0, pad_to_multiple=8)([row])  # 15 tokens + 1 pad
    with torch.no_grad():
        packed = model(batch["input_ids"], position_ids=batch["position_ids"])[0]
        offset = 0
        for doc in docs:
            n = len(doc["input_ids"])
            alone = model(doc["input_ids"][None])[0]
            torch.testing.assert_close(packed[offset : offset + n], alone, atol=1e-5, rtol=1e-5)
            offset += n
        # the loss of the row is the token-weighted mean of the documents' losses
        parts = model(
            batch["input_ids"],
            position_ids=batch["position_ids"],
            head_fn=next_token_head_loss(batch["labels"], 4),
        )
        per_doc = [
            model(d["input_ids"][None], head_fn=next_token_head_loss(d["labels"][None], 4)) for d in docs
        ]
    expected = sum(p.ce * p.count for p in per_doc) / sum(p.count for p in per_doc)
    assert int(parts.count) == sum(int(p.count) for p in per_doc) == 12
    torch.testing.assert_close(parts.ce, expected, atol=1e-5, rtol=1e-5)


def test_packed_batch_of_several_rows_keeps_documents_apart():
    cfg = load_config(["stage=text"]).model
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    rows = [
        [_doc(5, start=3), _doc(7, start=200)],
        [_doc(4, start=700), _doc(2, start=50), _doc(6, start=90)],
    ]
    batch = Collator(pad_token_id=0, pad_to_multiple=8)([join(r) for r in rows])
    with torch.no_grad():
        packed = model(batch["input_ids"], position_ids=batch["position_ids"])
        for b, docs in enumerate(rows):
            offset = 0
            for doc in docs:
                n = len(doc["input_ids"])
                alone = model(doc["input_ids"][None])[0]
                torch.testing.assert_close(packed[b, offset : offset + n], alone, atol=1e-5, rtol=1e-5)
                offset += n


def test_without_position_resets_documents_would_see_each_other():
    # guards the test above: the same row with plain positions gives different logits
    cfg = load_config(["stage=text"]).model
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    row = join([_doc(5, start=3), _doc(7, start=200)])
    with torch.no_grad():
        packed = model(row["input_ids"][None], position_ids=row["position_ids"][None])[0]
        plain = model(row["input_ids"][None])[0]
    torch.testing.assert_close(packed[:5], plain[:5])
    assert not torch.allclose(packed[5:], plain[5:], atol=1e-3)
