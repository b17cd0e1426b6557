"""Sample kinds: how one raw WebDataset sample (a dict of member bytes) becomes model inputs.

Only the members a kind expects are decoded, with explicit decoders: WebDataset's default
``.decode()`` would unpickle ``.pyd``/``.pickle`` members and ``torch.load`` ``.pth`` ones,
which runs code from a shard.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch
from PIL import Image

from lit_bluelm.chat import cot_messages, render_chat
from lit_bluelm.labels import IGNORE_INDEX
from lit_bluelm.processor import BlueLMProcessor
from lit_bluelm.tokenizer import IMAGE

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
Example = Dict[str, Any]


# Why a sample was skipped: the names of data/skipped/<reason> (README, "Bad data"). A saved
# count without a reason (a checkpoint older than the reasons) is "other".
SKIP_REASONS = (
    "decode",  # a member's bytes do not decode (image, UTF-8 text)
    "bad_json",  # the json member is not a JSON object, or lacks a field its kind needs
    "missing_member",  # no image / text member where the kind needs one
    "image_too_large",  # more than data.max_image_pixels, seen from the image header
    "no_room_for_image",  # the image tokens do not fit in data.seq_len
    "too_long",  # a conversation longer than data.seq_len (never split)
    "tar_error",  # an unreadable shard or tar member
    "invalid",  # decodes, but cannot be a sample (reserved marker, markers != images, ...)
    "other",  # any other failure of an encoder
)


class SampleError(ValueError):
    """A sample that cannot be used: skipped and counted under ``reason`` (a SKIP_REASONS name)."""

    def __init__(self, message: str, reason: str = "invalid") -> None:
        assert reason in SKIP_REASONS, reason
        super().__init__(message)
        self.reason = reason


class TooLong(SampleError):
    """A conversation longer than ``data.seq_len`` (never split): skipped, counted as ``too_long``."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "too_long")


def skip_reason(err: BaseException) -> str:
    """The SKIP_REASONS name a failure to read or encode a sample counts under."""
    return err.reason if isinstance(err, SampleError) else "other"


class Skips:
    """Samples skipped since the last example, per reason (SKIP_REASONS). Carried by examples,
    rows and batches as ``skipped`` (a batch holds ``as_list()`` as a tensor); saved in stream
    states as a dict of the non-zero counts."""

    __slots__ = ("counts",)

    def __init__(self, counts: Optional[Dict[str, int]] = None) -> None:
        self.counts = dict.fromkeys(SKIP_REASONS, 0)
        for reason, n in (counts or {}).items():
            self.counts[reason if reason in self.counts else "other"] += int(n)

    @classmethod
    def one(cls, reason: str) -> Skips:
        return cls({reason: 1})

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def too_long(self) -> int:
        return self.counts["too_long"]

    def __add__(self, other: Skips) -> Skips:
        return Skips({r: n + other.counts[r] for r, n in self.counts.items()})

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Skips) and self.counts == other.counts

    def __repr__(self) -> str:
        return f"Skips({ {r: n for r, n in self.counts.items() if n} })"

    def as_list(self) -> List[int]:
        """The counts in SKIP_REASONS order."""
        return [self.counts[r] for r in SKIP_REASONS]

    def as_dict(self) -> Dict[str, int]:
        """The non-zero counts (a stream state's form)."""
        return {r: n for r, n in self.counts.items() if n}

    @classmethod
    def of(cls, value: Any) -> Skips:
        """From a saved state or a batch: a dict by reason, a list (or tensor) in SKIP_REASONS
        order, and the forms of older checkpoints: ``[total, too_long]`` and a single count."""
        if isinstance(value, Skips):
            return value
        if isinstance(value, dict):
            return cls(value)
        value = value.tolist() if hasattr(value, "tolist") else value
        if isinstance(value, (int, float)):
            return cls({"other": int(value)})
        value = [int(v) for v in value]
        if len(value) == len(SKIP_REASONS):
            return cls(dict(zip(SKIP_REASONS, value, strict=True)))
        if len(value) == 2:
            total, too_long = value
            return cls({"too_long": too_long, "other": total - too_long})
        raise ValueError(f"not a count of skipped samples: {value!r}")

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
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise SampleError(f"json member does not parse: {err}", "bad_json") from None
    if not isinstance(value, dict):
        raise SampleError("json member is not an object", "bad_json")
    return value


def decode_text(raw: Dict[str, Any], meta: Dict[str, Any]) -> str:
    data = _member(raw, "txt")
    if data is not None:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise SampleError(f"txt member is not UTF-8: {err}", "decode") from None
    if isinstance(meta.get("text"), str):
        return meta["text"]
    raise SampleError(f"sample has no txt member and no json 'text' field ({sorted(raw)})", "missing_member")


def decode_image(raw: Dict[str, Any], processor: BlueLMProcessor) -> Image.Image:
    data = _member(raw, *IMAGE_EXTS)
    if data is None:
        raise SampleError(f"sample has no image member ({sorted(raw)})", "missing_member")
    return _open_image(data, processor)


def _open_image(data: bytes, processor: BlueLMProcessor) -> Image.Image:
    from lit_bluelm.processor import ImageTooLarge

    try:
        return processor.decode_image(data)
    except ImageTooLarge as err:
        raise SampleError(str(err), "image_too_large") from None
    except Exception as err:  # PIL raises many kinds on bad bytes
        raise SampleError(f"image does not decode: {type(err).__name__}: {err}", "decode") from None


def decode_images(raw: Dict[str, Any], processor: BlueLMProcessor) -> List[Image.Image]:
    """A chat sample's images in order: members ``0.png``, ``1.jpg``, ... by number (any of
    jpg/jpeg/png/webp), or a single plain ``jpg|png|webp`` member."""
    numbered = sorted(
        (int(m.group(1)), key) for key in raw if (m := re.fullmatch(r"(\d+)\.(jpg|jpeg|png|webp)", key))
    )
    keys = [key for _, key in numbered] or [ext for ext in IMAGE_EXTS if ext in raw][:1]
    return [_open_image(raw[key], processor) for key in keys]


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
    image = decode_image(raw, processor)
    text = caption if IMAGE in caption else f"{IMAGE}\n{caption}"
    encoded = processor.encode(text, [image], add_eos=True)
    ids = encoded.input_ids[:seq_len]
    n_image = encoded.input_ids.count(processor.image_token_id)
    if ids.count(processor.image_token_id) != n_image:  # never cut through image placeholders
        raise SampleError(
            f"image tokens ({n_image}) do not fit in data.seq_len={seq_len}", "no_room_for_image"
        )
    return _example(ids, encoded.pixel_values, meta, processor.image_token_id)


def _json_field(meta: Dict[str, Any], key: str, kind: type) -> Any:
    value = meta.get(key)
    if not isinstance(value, kind):
        raise SampleError(f"json member needs a '{key}' {kind.__name__} field", "bad_json")
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
        messages = _json_field(meta, "messages", list)
        encoded = processor.encode_conversation(messages, decode_images(raw, processor), trained=True)
    except SampleError:
        raise
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


def _reply(meta: Dict[str, Any], key: str) -> Dict[str, str]:
    """A preference sample's ``chosen`` or ``rejected`` reply as an assistant message."""
    reply = meta.get(key)
    if not isinstance(reply, dict) or not isinstance(reply.get("content"), str):
        raise SampleError(f"json member needs a '{key}' object with a 'content' string", "bad_json")
    thinking = reply.get("thinking")
    if thinking is not None and not isinstance(thinking, str):
        raise SampleError(f"'{key}.thinking' is a string", "bad_json")
    if not reply["content"].strip() and not (thinking or "").strip():
        raise SampleError(f"the {key} reply is empty")
    message = {"role": "assistant", "content": reply["content"]}
    if thinking is not None:
        message["thinking"] = thinking
    return message


def encode_preference(raw: Dict[str, Any], processor: BlueLMProcessor, seq_len: int) -> Example:
    """``json`` with ``messages`` (the prompt, ending with a user turn), ``chosen`` and
    ``rejected`` replies ``{content, thinking?}`` and an optional number ``margin`` (+ images as
    in ``chat``) -> a pair: ``input_ids`` the prompt with the chosen reply, ``rejected_ids`` with
    the rejected one, each rendered in the chat format + EOS (a reply with ``thinking`` in the
    thinking mode), ``pixel_values`` the prompt's images once, no LM targets. Never packed: the
    collator puts a batch's chosen rows first and its rejected rows after them, one forward for
    both (:class:`datamodules.collate.Collator`). A pair where either side is longer than
    ``seq_len`` is skipped (``too_long``); an empty or identical pair is ``invalid``."""
    meta = decode_json(raw)
    messages = _json_field(meta, "messages", list)
    chosen, rejected = _reply(meta, "chosen"), _reply(meta, "rejected")
    if chosen == rejected:
        raise SampleError("chosen and rejected replies are identical")
    margin = meta.get("margin", 0.0)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or margin != margin:
        raise SampleError("'margin' is a number", "bad_json")
    if not messages or not isinstance(messages[-1], dict) or messages[-1].get("role") != "user":
        raise SampleError("a preference prompt ends with a user message")
    images = decode_images(raw, processor)
    sides = []
    try:
        for reply in (chosen, rejected):
            sides.append(processor.encode_conversation([*messages, reply], images))
    except SampleError:
        raise
    except ValueError as err:
        raise SampleError(str(err)) from None
    longest = max(len(side.input_ids) for side in sides)
    if longest > seq_len:
        raise TooLong(f"a preference pair side of {longest} tokens > data.seq_len={seq_len}")
    example = _example(sides[0].input_ids, sides[0].pixel_values, meta, processor.image_token_id)
    example["labels"].fill_(IGNORE_INDEX)  # a reward, not next tokens, is learned from a pair
    example["rejected_ids"] = torch.tensor(sides[1].input_ids, dtype=torch.long)
    example["margin"] = float(margin)
    return example


def encode_rl_prompt(raw: Dict[str, Any], processor: BlueLMProcessor, seq_len: int) -> Example:
    """``json`` with ``messages`` (ending with a user turn), ``task`` (its reward route) and an
    optional ``answer`` string (what rule rewards check; a route that needs it refuses a prompt
    without it at scoring) (+ images as in ``chat``) -> a prompt to sample completions for:
    ``prompt_ids`` the generation prompt in each mode (``think``, ``no_think``), ``input_ids``
    the longer of them (for the loader's bookkeeping; no LM targets), ``pixel_values``, and
    ``prompt``: the ids by mode, ``messages``, ``answer``, ``task`` and the decoded ``images``. A prompt longer than ``seq_len`` is skipped
    (``too_long``)."""
    from lit_bluelm.chat import render_chat

    meta = decode_json(raw)
    messages = _json_field(meta, "messages", list)
    _json_field(meta, "task", str)
    answer = meta.get("answer")
    if answer is not None and not isinstance(answer, str):
        raise SampleError("'answer' is a string", "bad_json")
    if not messages or not isinstance(messages[-1], dict) or messages[-1].get("role") != "user":
        raise SampleError("an RL prompt ends with a user message")
    images = decode_images(raw, processor)
    prompts = {}
    try:
        for mode in ("think", "no_think"):
            text = render_chat(
                messages,
                enable_thinking=mode == "think",
                think_position=processor.think_position,
                add_generation_prompt=True,
            )
            prompts[mode] = processor.encode(text, images)
    except ValueError as err:
        raise SampleError(str(err)) from None
    longest = max(prompts.values(), key=lambda e: len(e.input_ids))
    if len(longest.input_ids) > seq_len:
        raise TooLong(f"a prompt of {len(longest.input_ids)} tokens > data.seq_len={seq_len}")
    example = _example(longest.input_ids, longest.pixel_values, meta, processor.image_token_id)
    example["labels"].fill_(IGNORE_INDEX)  # completions are sampled, not read
    example["prompt"] = {
        "ids": {mode: list(e.input_ids) for mode, e in prompts.items()},
        "messages": messages,
        "answer": answer,
        "task": meta["task"],
        "images": images,  # as decoded: what a learned reward re-reads with its own processor
    }
    return example


SAMPLE_KINDS: Dict[str, Callable[[Dict[str, Any], BlueLMProcessor, int], Example]] = {
    "text": encode_text,
    "image_text": encode_image_text,
    "chat": encode_chat,
    "cot": encode_cot,
    "preference": encode_preference,
    "rl_prompt": encode_rl_prompt,
}
# What an objective reads (``BlueLMModule.reads``): the kinds of each sample shape; a kind not
# named here is a single sequence
PAIR_KINDS = ("preference",)  # (chosen, rejected) pairs
PROMPT_KINDS = ("rl_prompt",)  # prompts to sample completions for


def sample_shape(kind: str) -> str:
    """``pairs``, ``prompts`` or ``sequences``: what an example of ``kind`` is."""
    return "pairs" if kind in PAIR_KINDS else "prompts" if kind in PROMPT_KINDS else "sequences"
