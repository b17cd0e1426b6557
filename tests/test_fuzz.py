"""Fuzz tests (hypothesis): no command line makes the config loader fail with anything but a
ConfigError, and no bytes in any member of a sample make an encoder fail with anything but a
SampleError (a skip counted under a named reason, never ``other``)."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from datamodules.kinds import IMAGE_EXTS, SAMPLE_KINDS, SKIP_REASONS, SampleError, skip_reason
from lit_bluelm.config import load_config
from lit_bluelm.errors import ConfigError
from tests.helpers import png_bytes

KEYS = [
    "stage",
    "model",
    "run_dir",
    "resume_from",
    "init_from",
    "seed",
    "dry_run",
    "data.seq_len",
    "data.batch_size",
    "data.num_workers",
    "data.mix",
    "data.mix.text",
    "data.sources",
    "data.sources.text.train",
    "data.sources.text.kind",
    "data.schedule",
    "data.max_image_pixels",
    "optim.lr.llm",
    "optim.name",
    "trainer.max_steps",
    "trainer.max_bad_steps",
    "trainer.precision",
    "trainer.accumulate_grad_batches",
    "checkpoint.every_n_steps",
    "model.llm.hidden_size",
    "model.vision.image_size",
    "context.rope",
    "sft.think_token_position",
    "distill.teacher",
    "no_such_key",
    "data.no_such_key",
]
VALUES = st.one_of(
    st.sampled_from(
        ["", "null", "auto", "true", "-1", "0", "1e30", "nan", "inf", "[1, 2]", "{a: 1}", "${stage}"]
        + ["${no.such.key}", "${oc.env:NO_SUCH_VAR_XYZ}", "joint", "tiny", "'quoted'", "[", "{", "a=b"]
    ),
    st.integers(-(2**40), 2**40).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.text(max_size=20),
)
ARGUMENT = st.one_of(
    st.tuples(st.sampled_from(KEYS), VALUES).map(lambda kv: f"{kv[0]}={kv[1]}"),
    st.text(max_size=30),  # anything at all, with or without "="
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=st.lists(ARGUMENT, max_size=4))
def test_no_command_line_makes_the_config_loader_fail_otherwise_than_with_a_config_error(
    argv, tmp_path_factory
):
    run_dir = tmp_path_factory.mktemp("fuzz") / "run"  # where a run would write, if it were started
    try:
        load_config([f"run_dir={run_dir}", "trainer.accelerator=cpu", *argv])
    except ConfigError as err:  # what train.py prints as its one "error:" line
        assert str(err).strip(), repr(err)
    except SystemExit as exit_:  # the usage text (e.g. for --help) is no traceback either
        assert exit_.code in (0, 2), exit_.code


MEMBERS = st.sampled_from(["json", "txt", *IMAGE_EXTS, "0.png", "1.jpg", "pyd", "pickle", "pth", "cls"])
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
FIELDS = st.dictionaries(
    st.sampled_from(["text", "messages", "question", "thinking", "answer", "task", "role", "content"]),
    JSON_VALUES,
    max_size=4,
)
MESSAGES = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "system", "tool", "x"]) | JSON_VALUES},
        optional={
            "content": st.text(max_size=30) | JSON_VALUES,
            "thinking": st.text(max_size=20) | JSON_VALUES,
        },
    ),
    max_size=4,
)
MEMBER_BYTES = st.one_of(
    st.binary(max_size=64),
    FIELDS.map(lambda d: json.dumps(d).encode()),
    MESSAGES.map(lambda m: json.dumps({"messages": m}).encode()),
    st.text(max_size=40).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.just(png_bytes((16, 16))),
    st.just(b"<image>"),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(sorted(SAMPLE_KINDS)), raw=st.dictionaries(MEMBERS, MEMBER_BYTES, max_size=4))
def test_arbitrary_member_bytes_are_a_counted_skip_never_a_crash(processor, kind, raw):
    raw = {"__key__": "fuzz", **raw}
    try:
        example = SAMPLE_KINDS[kind](raw, processor, 128)
    except SampleError as err:
        assert skip_reason(err) in SKIP_REASONS and skip_reason(err) != "other", err
        return
    assert len(example["input_ids"]) == len(example["labels"]) > 0


def test_the_fuzzed_loader_refuses_a_known_bad_value():  # the strategy's ground is covered
    with pytest.raises(ConfigError):
        load_config(["data.seq_len=0"])
