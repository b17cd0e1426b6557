"""Sample kinds: how one raw WebDataset sample (a dict of member bytes) becomes model inputs.

Only the members a kind expects are decoded, with explicit decoders: WebDataset's default
``.decode()`` would unpickle ``.pyd``/``.pickle`` members and ``torch.load`` ``.pth`` ones,
which runs code from a shard.
"""

from __future__ import annotations

import io
import json
import re
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional

import torch
from PIL import Image

from lit_bluelm.chat import cot_messages, render, render_chat
from lit_bluelm.labels import IGNORE_INDEX
from lit_bluelm.processor import BlueLMProcessor
from lit_bluelm.tokenizer import IMAGE

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
Example = Dict[str, Any]


class SampleError(ValueError):
    """A sample that cannot be used (bad bytes, missing member, too long): skipped and counted."""


class TooLong(SampleError):
    """A conversation longer than ``data.seq_len`` (never split): skipped, counted as ``too_long``."""


class Skips(NamedTuple):
    """Samples skipped since the last example: all of them, and how many of them were too long.
    Carried by examples, rows and batches as ``skipped``; saved in stream states as a list."""

    total: int = 0
    too_long: int = 0

    def __add__(self, other: Skips) -> Skips:  # type: ignore[override]
        return Skips(self.total + other.total, self.too_long + other.too_long)

    @classmethod
    def of(cls, value: Any) -> Skips:
        """From a saved state or a batch: ``[total, too_long]`` (a list or a tensor), or the single
        count of older checkpoints."""
        value = value.tolist() if hasattr(value, "tolist") else value
        return cls(int(value), 0) if isinstance(value, (int, float)) else cls(*map(int, value))

    @classmethod
    def sum(cls, values: Iterable[Any]) -> Skips:
        total = cls()
        for value in values:
            total = total + cls.of(value)
        return total


def _member(raw: Dict[str, Any], *exts: str) -> Optional[bytes]:
    for ext in exts:
        if ext in raw:
            return raw[ext]
    return None


def decode_json(raw: Dict[str, Any]) -> Dict[str, Any]:
    data = _member(raw, "json")
    if data is None:
        return {}
    value = json.loads(data.decode("utf-8"))
    if not isinstance(value, dict):
        raise SampleError("json member is not an object")
    return value


def decode_text(raw: Dict[str, Any], meta: Dict[str, Any]) -> str:
    data = _member(raw, "txt")
    if data is not None:
        return data.decode("utf-8")
    if isinstance(meta.get("text"), str):
        return meta["text"]
    raise SampleError(f"sample has no txt member and no json 'text' field ({sorted(raw)})")


def decode_image(raw: Dict[str, Any]) -> Image.Image:
    data = _member(raw, *IMAGE_EXTS)
    if data is None:
        raise SampleError(f"sample has no image member ({sorted(raw)})")
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.convert("RGB")


def decode_images(raw: Dict[str, Any]) -> List[Image.Image]:
    """A chat sample's images in order: members ``0.png``, ``1.jpg``, ... by number (any of
    jpg/jpeg/png/webp), or a single plain ``jpg|png|webp`` member."""
    numbered = sorted(
        (int(m.group(1)), key) for key in raw if (m := re.fullmatch(r"(\d+)\.(jpg|jpeg|png|webp)", key))
    )
    keys = [key for _, key in numbered] or [ext for ext in IMAGE_EXTS if ext in raw][:1]
    images = []
    for key in keys:
        with Image.open(io.BytesIO(raw[key])) as img:
            img.load()
            images.append(img.convert("RGB"))
    return images


def _example(
    ids: list,
    pixel_values: Optional[torch.Tensor],
    meta: Dict[str, Any],
    image_id: int,
    trained: Optional[List[bool]] = None,
) -> Example:
    input_ids = torch.tensor(ids, dtype=torch.long)
    labels = input_ids.clone()
    labels[input_ids == image_id] = IGNORE_INDEX  # never predict image placeholders
    if trained is not None:  # only the trained spans (assistant replies) are targets
        labels[~torch.tensor(trained, dtype=torch.bool)] = IGNORE_INDEX
    return {
        "input_ids": input_ids,
        "labels": labels,
        "pixel_values": pixel_values,
        "task": str(meta.get("task", "")),
    }


def encode_text(raw: Dict[str, Any], processor: BlueLMProcessor, seq_len: int) -> Example:
    """``txt`` (or ``json`` with a ``text`` field) -> tokens + EOS, whole: a document longer than
    ``seq_len`` is split into pieces later (``datamodules.packing``), never cut or dropped."""
    meta = decode_json(raw)
    return _encode_plain(decode_text(raw, meta), meta, processor)


def encode_image_text(raw: Dict[str, Any], processor: BlueLMProcessor, seq_len: int) -> Example:
    """``jpg|png|webp`` + ``txt`` caption (+ ``json`` metadata) -> ``<image>\\n caption``."""
    meta = decode_json(raw)
    caption = decode_text(raw, meta)
    image = decode_image(raw)
    text = caption if IMAGE in caption else f"{IMAGE}\n{caption}"
    encoded = processor.encode(text, [image], add_eos=True)
    ids = encoded.input_ids[:seq_len]
    n_image = encoded.input_ids.count(processor.image_token_id)
    if ids.count(processor.image_token_id) != n_image:  # never cut through image placeholders
        raise SampleError(f"image tokens ({n_image}) do not fit in data.seq_len={seq_len}")
    return _example(ids, encoded.pixel_values, meta, processor.image_token_id)


def _json_field(meta: Dict[str, Any], key: str, kind: type) -> Any:
    value = meta.get(key)
    if not isinstance(value, kind):
        raise SampleError(f"json member needs a '{key}' {kind.__name__} field")
    return value


def _encode_plain(text: str, meta: Dict[str, Any], processor: BlueLMProcessor) -> Example:
    if IMAGE in text:
        raise SampleError(f"text sample contains the reserved marker {IMAGE}")
    encoded = processor.encode(text, add_eos=True)
    return _example(encoded.input_ids, None, meta, processor.image_token_id)


def encode_chat(raw: Dict[str, Any], processor: BlueLMProcessor, seq_len: int) -> Example:
    """``json`` with ``messages`` [{role, content, thinking?}] (+ images placed by ``<image>``
    markers in the messages, see :func:`decode_images`) -> the chat format + EOS, with only the
    assistant replies as targets. The final assistant message's ``thinking`` makes it a
    thinking-mode sample. A conversation longer than ``seq_len`` is skipped (never split)."""
    meta = decode_json(raw)
    try:
        rendered = render(_json_field(meta, "messages", list), think_position=processor.think_position)
        encoded = processor.encode(
            rendered.text, decode_images(raw), add_eos=True, trained_spans=rendered.trained
        )
    except ValueError as err:
        raise SampleError(str(err)) from None
    if len(encoded.input_ids) > seq_len:
        raise TooLong(f"a conversation of {len(encoded.input_ids)} tokens > data.seq_len={seq_len}")
    return _example(encoded.input_ids, encoded.pixel_values, meta, processor.image_token_id, encoded.trained)


def encode_cot(raw: Dict[str, Any], processor: BlueLMProcessor, seq_len: int) -> Example:
    """``json`` with ``question``, ``thinking`` and ``answer`` -> a user turn and an assistant turn
    that reasons inside ``<think>`` ... ``</think>`` before answering."""
    meta = decode_json(raw)
    fields = [_json_field(meta, k, str) for k in ("question", "thinking", "answer")]
    return _encode_plain(render_chat(cot_messages(*fields)), meta, processor)


SAMPLE_KINDS: Dict[str, Callable[[Dict[str, Any], BlueLMProcessor, int], Example]] = {
    "text": encode_text,
    "image_text": encode_image_text,
    "chat": encode_chat,
    "cot": encode_cot,
}
