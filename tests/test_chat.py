"""The chat format: one renderer, the same Jinja template, thinking on/off and both placements."""

import itertools

import pytest

from lit_bluelm.chat import chat_template, render, render_chat
from lit_bluelm.tokenizer import IMAGE, THINK_CONTROL, load_tokenizer

TEXT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 12 + 7 + 5?"},
    {"role": "assistant", "content": "24", "thinking": "12 + 7 = 19\n19 + 5 = 24"},
]
IMAGE_CHAT = [
    {"role": "user", "content": f"{IMAGE}\nHow many red squares are there?"},
    {"role": "assistant", "content": "3", "thinking": "one, two, three"},
    {"role": "user", "content": f"And in this one?\n{IMAGE}"},
    {"role": "assistant", "content": "2"},
]


def test_thinking_on_and_off_by_hand():
    on = render_chat(TEXT)
    assert on == (
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n"
        f"<|im_start|>user\nWhat is 12 + 7 + 5?\n{THINK_CONTROL}<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n12 + 7 = 19\n19 + 5 = 24\n</think>\n24<|im_end|>\n"
    )
    off = render_chat(TEXT, enable_thinking=False)
    assert THINK_CONTROL not in off and "<think>" not in off and off.endswith("assistant\n24<|im_end|>\n")
    before = render_chat(TEXT, think_position="before_query")
    assert f"<|im_start|>user\n{THINK_CONTROL}\nWhat is 12 + 7 + 5?<|im_end|>" in before
    # multi-turn: the last turn decides (no thinking there), earlier replies keep only answers
    multi = render_chat(IMAGE_CHAT)
    assert THINK_CONTROL not in multi and "one, two, three" not in multi
    prompt = render_chat(IMAGE_CHAT[:3], enable_thinking=True, add_generation_prompt=True)
    assert prompt.endswith(f"And in this one?\n{IMAGE}\n{THINK_CONTROL}<|im_end|>\n<|im_start|>assistant\n")


def test_trained_spans_are_the_assistant_replies_only():
    r = render(IMAGE_CHAT)
    assert [r.text[a:b] for a, b in r.trained] == ["3<|im_end|>", "2<|im_end|>"]
    r = render(TEXT)
    assert [r.text[a:b] for a, b in r.trained] == [
        "<think>\n12 + 7 = 19\n19 + 5 = 24\n</think>\n24<|im_end|>"
    ]


@pytest.mark.parametrize("position", ["after_query", "before_query"])
def test_the_jinja_template_renders_exactly_what_the_renderer_does(demo_dir, position):
    tok = load_tokenizer(demo_dir / "tokenizer")
    tok.chat_template = chat_template(position)
    for messages, thinking, prompt in itertools.product(
        (TEXT, IMAGE_CHAT, TEXT[:2], IMAGE_CHAT[:3]), (None, True, False), (False, True)
    ):
        ours = render_chat(
            messages, enable_thinking=thinking, think_position=position, add_generation_prompt=prompt
        )
        kwargs = {} if thinking is None else {"enable_thinking": thinking}
        theirs = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt, **kwargs)
        assert theirs == ours, (messages, thinking, prompt)
        ids = tok.apply_chat_template(
            messages, tokenize=True, return_dict=True, add_generation_prompt=prompt, **kwargs
        )["input_ids"]
        assert list(ids) == tok(ours, add_special_tokens=False)["input_ids"]


def test_bad_messages_are_refused():
    with pytest.raises(ValueError, match="unknown chat role"):
        render([{"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match="thinking"):
        render([{"role": "user", "content": "x", "thinking": "y"}])
    with pytest.raises(ValueError, match="at least one message"):
        render([])
