"""The generation engine: the thinking budget's edge cases (each a bug seen elsewhere) on a
scripted model whose every next token is given, then the engine on real tiny models: greedy ids
equal transformers' generate with left padding, seeded sampling, images, stop strings."""

import pytest
import torch
from torch import nn
from transformers import Qwen2Config

from lit_bluelm.chat import split_reply
from lit_bluelm.errors import ConfigError
from lit_bluelm.generation import GenerationConfig, Generator, Prompt, build_prompt, choose
from lit_bluelm.tokenizer import IM_END, THINK_END, THINK_START, load_tokenizer


class _Out:
    def __init__(self, hidden):
        self.last_hidden_state = hidden


class _ScriptedBase(nn.Module):
    """At the k-th generated position of row b, the hidden state is a one-hot of script[b][k]."""

    def __init__(self, owner):
        super().__init__()
        self.__dict__["owner"] = owner  # not a submodule (that would be a cycle)

    def forward(self, inputs_embeds, attention_mask, position_ids, use_cache, cache):
        o = self.owner
        b, t = inputs_embeds.shape[:2]
        k = attention_mask.shape[1] - o.prompt_len  # tokens generated so far
        hidden = torch.zeros(b, t, o.vocab)
        for row, script in enumerate(o.scripts):
            hidden[row, -1, script[min(k, len(script) - 1)]] = 1.0
        o.seen.append(inputs_embeds[:, -1, 0].long().tolist())  # the ids fed back
        return _Out(hidden)


class ScriptedLLM(nn.Module):
    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.config = Qwen2Config(vocab_size=vocab, hidden_size=8, num_hidden_layers=1, num_attention_heads=1)
        self.base_model = _ScriptedBase(self)
        self.scripts, self.prompt_len, self.seen = [], 0, []

    def get_input_embeddings(self):
        return lambda ids: ids[..., None].float().expand(*ids.shape, 2)


class ScriptedModel(nn.Module):
    """A BlueLM stand-in: ``generate`` sees the tokens its scripts dictate (logit 10 vs 0)."""

    def __init__(self, vocab):
        super().__init__()
        self.llm = ScriptedLLM(vocab)
        self.weight = nn.Parameter(torch.zeros(1))

    def embed(self, input_ids, pixel_values=None):
        return self.llm.get_input_embeddings()(input_ids)

    def output_head(self):
        return lambda hidden: hidden * 10.0


@pytest.fixture(scope="module")
def tok(demo_dir):
    return load_tokenizer(demo_dir / "tokenizer")


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _run(tok, scripts, prompt_ids=None, vocab=None, **cfg):
    model = ScriptedModel(vocab or len(tok))
    prompt_ids = prompt_ids or _ids(tok, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    model.llm.scripts, model.llm.prompt_len = scripts, len(prompt_ids)
    gen = Generator(model, tok)
    return gen.generate([Prompt(list(prompt_ids)) for _ in scripts], GenerationConfig(**cfg)), model


def _script(tok, text):
    return _ids(tok, text)


def test_the_budget_caps_model_chosen_thinking_and_forces_the_end(tok):
    script = _script(tok, f"{THINK_START}\n1 + 2 = 3. 3 + 4 = 7.\n{THINK_END}\n7{IM_END}")
    [out], _ = _run(tok, [script], thinking_budget=4, thinking_end_text=" Stop.\n")
    assert out.thinking_tokens == 4 and out.budget_exhausted
    forced = [t for t, f in zip(out.token_ids, out.forced, strict=True) if f]
    assert forced == _ids(tok, f" Stop.\n{THINK_END}\n")
    # <think>, 4 chosen tokens, then the forced end; the answer follows
    assert out.token_ids[:5] == script[:5]
    assert out.text.startswith(tok.decode(script[:5]) + " Stop.\n" + THINK_END + "\n")
    assert out.finish_reason == "stop"


def test_no_budget_and_a_budget_not_reached_force_nothing(tok):
    script = _script(tok, f"{THINK_START}\n1 + 2 = 3.\n{THINK_END}\n3{IM_END}")
    n_inside = len(_script(tok, "\n1 + 2 = 3.\n"))
    for budget in (None, n_inside + 1, n_inside + 5):
        [out], _ = _run(tok, [script], thinking_budget=budget)
        assert not any(out.forced) and not out.budget_exhausted
        assert out.thinking_tokens == n_inside and out.answer == "3" and out.thinking == "1 + 2 = 3."
        assert out.token_ids == script  # the stop token ends the ids ...
        assert IM_END not in out.text  # ... but not the text


def test_budget_zero_closes_the_block_right_after_think(tok):
    script = _script(tok, f"{THINK_START}\nlong thoughts here\n{THINK_END}\n5{IM_END}")
    [out], _ = _run(tok, [script], thinking_budget=0, thinking_end_text="\n")
    assert out.thinking_tokens == 0 and out.budget_exhausted
    assert out.token_ids[0] == tok.convert_tokens_to_ids(THINK_START)
    assert all(out.forced[1 : 1 + len(_ids(tok, f"\n{THINK_END}\n"))])
    assert out.text.startswith(f"{THINK_START}\n{THINK_END}\n")


def test_think_blocks_in_the_prompt_or_earlier_turns_do_not_count(tok):
    earlier = (
        f"<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n{THINK_START}\na b c d e f\n{THINK_END}\n"
        f"x<|im_end|>\n<|im_start|>user\nq\n[|BlueThink|]<|im_end|>\n<|im_start|>assistant\n{THINK_START}\nopen"
    )
    script = _script(tok, f"{THINK_START}\n1 2\n{THINK_END}\n3{IM_END}")
    inside = len(_ids(tok, "\n1 2\n"))
    [out], _ = _run(tok, [script], prompt_ids=_ids(tok, earlier), thinking_budget=inside + 1)
    # the prompt's blocks (even an unclosed one) count for nothing: the reply's own block fits
    assert out.thinking_tokens == inside and not out.budget_exhausted and out.answer == "3"
    # when the budget's last token is spent, the end is forced (even if the model would close)
    [out], _ = _run(tok, [script], prompt_ids=_ids(tok, earlier), thinking_budget=inside)
    assert out.thinking_tokens == inside and out.budget_exhausted


def test_a_second_think_inside_the_block_does_not_restart_the_count(tok):
    script = _script(tok, f"{THINK_START}\na b {THINK_START}\nc d e f g\n{THINK_END}\n1{IM_END}")
    budget = len(_ids(tok, "\na b ")) + 3  # the stray <think> and two more
    [out], _ = _run(tok, [script], thinking_budget=budget)
    assert out.thinking_tokens == budget and out.budget_exhausted
    first_forced = out.forced.index(True)
    assert first_forced == 1 + budget  # the opening <think>, then the budget, stray one included
    assert out.token_ids[:first_forced] == script[:first_forced]
    assert tok.convert_tokens_to_ids(THINK_START) in out.token_ids[1:first_forced]


def test_a_think_end_after_the_forced_one_opens_nothing_new(tok):
    from lit_bluelm.generation import DEFAULT_THINKING_END

    end = _ids(tok, DEFAULT_THINKING_END + THINK_END + "\n")
    after = _ids(tok, f"x {THINK_END} {THINK_START} y z")
    # the scripted model's choice at a forced step is overridden: pad the script there
    script = _script(tok, f"{THINK_START}\na") + [0] * len(end) + after + [tok.convert_tokens_to_ids(IM_END)]
    [out], _ = _run(tok, [script], thinking_budget=2)
    assert out.thinking_tokens == 2 and out.budget_exhausted
    assert sum(out.forced) == len(end)  # forced once: the model's </think> later forces nothing
    assert out.answer_tokens == len(after)  # every model token after the block is an answer token
    assert out.answer == tok.decode(after).strip() and out.finish_reason == "stop"


def test_a_budget_larger_than_max_new_tokens_ends_by_length(tok):
    script = _script(tok, f"{THINK_START}\n" + "a " * 50)
    [out], _ = _run(tok, [script], thinking_budget=100, max_new_tokens=10)
    assert len(out.token_ids) == 10 and out.finish_reason == "length"
    assert out.thinking_tokens == 9 and not out.budget_exhausted and out.answer == ""


def test_max_answer_tokens_caps_the_answer_not_the_thinking(tok):
    script = _script(tok, f"{THINK_START}\na b c\n{THINK_END}\n" + "z " * 30)
    [out], _ = _run(tok, [script], max_answer_tokens=4)
    assert out.answer_tokens == 4 and out.finish_reason == "length" and out.thinking_tokens > 0


def test_padded_vocabulary_rows_are_never_chosen(tok):
    vocab = len(tok) + 8  # the LLM has rows the tokenizer does not
    padded = [len(tok) + 3] * 5  # the scripted model prefers a padded row every time
    for temperature in (0.0, 1.0):
        [out], _ = _run(tok, [padded], vocab=vocab, max_new_tokens=5, temperature=temperature)
        assert all(t < len(tok) for t in out.token_ids)


def test_the_image_placeholder_is_never_chosen(tok):
    image = tok.convert_tokens_to_ids("<image>")
    model = ScriptedModel(len(tok))
    model.image_token_id = image
    prompt = _ids(tok, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    model.llm.scripts, model.llm.prompt_len = [[image] * 5], len(prompt)  # it prefers <image>
    for temperature in (0.0, 1.0):
        [out] = Generator(model, tok).generate(
            [Prompt(prompt)], GenerationConfig(max_new_tokens=5, temperature=temperature)
        )
        assert image not in out.token_ids


def test_rows_finish_independently_and_the_chosen_ids_are_fed_back(tok):
    short = _script(tok, f"7{IM_END}")
    long = _script(tok, f"1 2 3 4{IM_END}")
    (a, b), model = _run(tok, [short, long])
    assert a.text == "7" and b.text == "1 2 3 4"
    assert [step[1] for step in model.llm.seen[1:]] == long[:-1]


def test_stop_strings_end_the_text_before_them(tok):
    script = _script(tok, "The answer is 42. Question: more" + IM_END)
    [out], _ = _run(tok, [script], stop=("Question:",))
    assert out.text == "The answer is 42. " and out.finish_reason == "stop"


def test_bad_settings_are_one_line_errors(tok):
    with pytest.raises(ConfigError, match="thinking_budget must be >= 0"):
        _run(tok, [[1]], thinking_budget=-1)
    with pytest.raises(ConfigError, match="top_p"):
        _run(tok, [[1]], top_p=0)
    with pytest.raises(ConfigError, match="exceeds the model's context"):
        _run(tok, [[1]], max_new_tokens=1 << 31)


def test_choose_greedy_top_k_and_top_p_on_hand_made_logits():
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0]])
    tokens, logp, _ = choose(logits, GenerationConfig(), None)
    assert tokens.tolist() == [1] and torch.allclose(logp, torch.log_softmax(logits, -1)[:, 1])
    g = torch.Generator().manual_seed(0)
    picks = {choose(logits, GenerationConfig(temperature=1.0, top_k=2), g)[0].item() for _ in range(200)}
    assert picks == {1, 2}
    # top_p=0.5: token 1 alone holds 0.66 of the mass, so it is the only one kept (log-prob 0)
    tokens, logp, _ = choose(logits, GenerationConfig(temperature=1.0, top_p=0.5), g)
    assert tokens.tolist() == [1] and abs(logp.item()) < 1e-6


def test_split_reply():
    assert split_reply(f"{THINK_START}\n1 + 1 = 2.\n{THINK_END}\n2") == ("1 + 1 = 2.", "2")
    assert split_reply("just 2") == (None, "just 2")
    assert split_reply(f"{THINK_START}\nnever closed") == ("never closed", "")


# ----------------------------------------------------------------------------- real models


@pytest.fixture(scope="module")
def tiny(demo_dir):
    from lit_bluelm.config import load_config
    from lit_bluelm.models import build_model
    from lit_bluelm.processor import BlueLMProcessor
    from lit_bluelm.trainer import attach_tokenizer

    cfg = load_config([f"tokenizer.path={demo_dir}/tokenizer"])
    tok = load_tokenizer(demo_dir / "tokenizer")
    attach_tokenizer(cfg, tok)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.context).eval()
    return model, tok, BlueLMProcessor.from_config(tok, cfg.model)


def test_greedy_ids_equal_transformers_generate_with_left_padding(tiny):
    model, tok, processor = tiny
    texts = ["What is 1 + 2?", "The capital of Kalomi is", "How many red shapes are there in the picture?"]
    prompts = [build_prompt(processor, t) for t in texts]
    outs = Generator(model, tok).generate(prompts, GenerationConfig(max_new_tokens=12, ignore_eos=True))
    longest = max(len(p.input_ids) for p in prompts)
    ids = torch.tensor([[tok.pad_token_id] * (longest - len(p.input_ids)) + p.input_ids for p in prompts])
    mask = (
        torch.arange(longest)[None] >= torch.tensor([longest - len(p.input_ids) for p in prompts])[:, None]
    ).long()
    ref = model.llm.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=12,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=None,
        # the LLM's vocabulary rows past the tokenizer's are padding, which the engine never picks
        suppress_tokens=list(range(len(tok), model.llm.config.vocab_size)),
    )
    assert len(tok) < model.llm.config.vocab_size  # (so this test also covers padded rows)
    assert [o.token_ids for o in outs] == ref[:, longest:].tolist()


def test_seeded_sampling_repeats_and_an_image_prompt_generates(tiny, demo_dir):
    from PIL import Image

    model, tok, processor = tiny
    image = Image.new("RGB", (224, 112), (200, 30, 30))
    prompts = [
        build_prompt(processor, "What colour is the shape?", [image], think=True),
        build_prompt(processor, "hi"),
    ]
    cfg = GenerationConfig(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    gen = Generator(model, tok)
    model.train()  # a policy mid-training: generation runs in eval mode and gives it back
    first, again = gen.generate(prompts, cfg), gen.generate(prompts, cfg)
    assert model.training
    model.eval()
    assert [o.token_ids for o in first] == [o.token_ids for o in again]
    other = gen.generate(prompts, GenerationConfig(max_new_tokens=8, temperature=1.0, seed=4))
    assert [o.token_ids for o in other] != [o.token_ids for o in first]
    assert all(len(o.logprobs) == len(o.token_ids) for o in first)
    assert all(lp <= 0 for o in first for lp in o.logprobs)
    with pytest.raises(ConfigError, match="1 <image> markers but 2 images"):
        build_prompt(processor, "<image> one marker", [image, image])


def test_the_direct_decode_step_matches_the_models_forward_token_for_token(tiny):
    from PIL import Image

    from lit_bluelm.fast_decode import FastDecoder

    model, tok, processor = tiny
    assert FastDecoder.supports(model.llm.base_model)  # Qwen2: the direct path applies
    image = Image.new("RGB", (112, 224), (40, 80, 220))
    prompts = [
        build_prompt(processor, "How many blue shapes are there?", [image], think=True),
        build_prompt(processor, "What is 4 + 5 + 6?"),
        build_prompt(processor, "hi"),
    ]
    for cfg in (
        GenerationConfig(max_new_tokens=16, ignore_eos=True),
        GenerationConfig(max_new_tokens=16, temperature=0.8, top_k=40, seed=5, thinking_budget=3),
    ):
        fast = Generator(model, tok).generate(prompts, cfg)
        plain = Generator(model, tok, fast=False).generate(prompts, cfg)
        assert [o.token_ids for o in fast] == [o.token_ids for o in plain]
        for a, b in zip(fast, plain, strict=True):
            assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4)


def test_the_direct_decode_step_applies_only_where_it_is_exact():
    from transformers import (
        LlamaConfig,
        LlamaModel,
        MistralConfig,
        MistralModel,
        Qwen2Config,
        Qwen2Model,
        Qwen3Config,
        Qwen3Model,
    )

    from lit_bluelm.fast_decode import FastDecoder

    kw = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    assert FastDecoder.supports(Qwen2Model(Qwen2Config(**kw)))
    assert FastDecoder.supports(LlamaModel(LlamaConfig(**kw)))
    assert FastDecoder.supports(MistralModel(MistralConfig(sliding_window=None, **kw)))
    # a sliding window, or q/k norms (Qwen3), are not modelled: the model's forward runs instead
    assert not FastDecoder.supports(Qwen2Model(Qwen2Config(use_sliding_window=True, sliding_window=16, **kw)))
    assert not FastDecoder.supports(MistralModel(MistralConfig(sliding_window=16, **kw)))
    assert not FastDecoder.supports(Qwen3Model(Qwen3Config(**kw)))


class _CollectiveBase(_ScriptedBase):
    """A scripted decoder whose every forward is a collective, as a sharded one's is."""

    def forward(self, inputs_embeds, attention_mask, position_ids, use_cache, cache):
        torch.distributed.all_reduce(torch.ones(1))
        return super().forward(inputs_embeds, attention_mask, position_ids, use_cache, cache)


def _lockstep_rank(rank: int, init: str, tokenizer_dir: str, out: str) -> None:
    import json

    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    tok = load_tokenizer(tokenizer_dir)
    model = ScriptedModel(len(tok))
    model.llm.base_model = _CollectiveBase(model.llm)
    prompt = _ids(tok, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    # rank 0's reply ends after 2 tokens, rank 1's after 6
    model.llm.scripts = [_ids(tok, "7" + IM_END) if rank == 0 else _ids(tok, "1 2 3 4 5" + IM_END)]
    model.llm.prompt_len = len(prompt)
    gen = Generator(model, tok, fast=False, lockstep=True)
    [reply] = gen.generate([Prompt(prompt)], GenerationConfig(max_new_tokens=16))
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"text": reply.text, "forwards": len(model.llm.seen)}, f)
    torch.distributed.destroy_process_group()


def test_lockstep_decoding_keeps_every_rank_stepping_until_the_last_row_finishes(demo_dir, tmp_path):
    """Two gloo processes whose replies end at different steps and whose decoder forward is a
    collective: the rank that finished first keeps stepping (no hang); its reply is unchanged."""
    import json

    import torch.multiprocessing as mp

    out = str(tmp_path / "reply")
    init = f"file://{tmp_path / 'store'}"
    mp.start_processes(
        _lockstep_rank, args=(init, str(demo_dir / "tokenizer"), out), nprocs=2, start_method="spawn"
    )
    first, second = (json.loads((tmp_path / f"reply.{r}").read_text()) for r in (0, 1))
    assert first["text"] == "7" and second["text"] == "1 2 3 4 5"
    assert first["forwards"] == second["forwards"]  # rank 0 stepped until rank 1 was done
    with pytest.raises(ValueError, match="lockstep decoding runs the model's own forward"):
        Generator(ScriptedModel(8), load_tokenizer(demo_dir / "tokenizer"), lockstep=True)
