"""Stage 4, long context: YaRN as transformers computes it (once), switched by the stage and kept
by every later stage, rows at the switched length, the loss beyond the original context, and
the passkey prompts of the needle-in-a-haystack evaluation."""

import math
import random

import pytest
import torch
from transformers import AutoConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from lit_bluelm import needle
from lit_bluelm.checkpoint import load_run
from lit_bluelm.config import ConfigError, load_config, to_container
from lit_bluelm.labels import IGNORE_INDEX
from lit_bluelm.models import build_model
from lit_bluelm.models.llm import llm_config
from lit_bluelm.modules.next_token import NextTokenModule, beyond
from lit_bluelm.startup import load_run_config
from lit_bluelm.summary import load_summary
from lit_bluelm.tokenizer import load_tokenizer
from lit_bluelm.trainer import dry_run, fit_stage
from tests.helpers import SMALL, run_args

YARN = {"rope_type": "yarn", "factor": 8.0, "beta_fast": 32.0, "beta_slow": 1.0}


def _rotary(model):
    return model.llm.model.rotary_emb


def _qwen2(cfg, rope_parameters, length):
    """A transformers config of the tiny preset with ``rope_parameters`` stated directly."""
    kwargs = {k: v for k, v in to_container(cfg)["model"]["llm"]["config"].items() if k != "model_type"}
    kwargs |= {"rope_parameters": rope_parameters, "max_position_embeddings": length}
    return AutoConfig.for_model("qwen2", **kwargs)


def _paper_yarn(base: float, dim: int, factor: float, original: int, beta_fast: float, beta_slow: float):
    """YaRN's inverse frequencies written from the paper (Peng et al., 2023, section 3.2)."""
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)

    def correction_dim(rotations: float) -> float:  # the dimension that turns `rotations` times
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float) - low) / max(high - low, 1e-3)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolated (kept), 0: interpolated (divided by the factor)
    return (1 / pos_freqs) * keep + (1 / (factor * pos_freqs)) * (1 - keep), 0.1 * math.log(factor) + 1


def test_the_stage_switch_is_transformers_own_yarn_applied_once():
    cfg = load_config(["stage=long_context"])
    hf = llm_config(cfg.model.llm, cfg.context.rope)
    assert hf.rope_parameters["original_max_position_embeddings"] == 512
    assert hf.max_position_embeddings == 4096
    model = build_model(cfg.model, cfg.context)
    rotary = _rotary(model)
    # transformers' own YaRN for the same parameters, from a config that states them directly
    direct = _qwen2(cfg, {**YARN, "rope_theta": 10000.0, "original_max_position_embeddings": 512}, 4096)
    inv, scale = ROPE_INIT_FUNCTIONS["yarn"](direct, torch.device("cpu"))
    torch.testing.assert_close(rotary.inv_freq, inv)
    assert rotary.attention_scaling == pytest.approx(scale)
    head_dim = hf.hidden_size // hf.num_attention_heads
    paper, mscale = _paper_yarn(10000.0, head_dim, 8.0, 512, 32.0, 1.0)
    torch.testing.assert_close(rotary.inv_freq, paper)
    assert scale == pytest.approx(mscale) and mscale == pytest.approx(1.2079, abs=1e-4)
    # the scaling is applied once: cos^2 + sin^2 is the attention factor squared, not its 4th power
    x = torch.zeros(1, 3, hf.hidden_size)
    cos, sin = rotary(x, torch.tensor([[0, 1000, 4000]]))
    torch.testing.assert_close(cos**2 + sin**2, torch.full_like(cos, mscale**2))
    # forgetting the original length (transformers' fallback: max_position_embeddings) differs
    forgot = _qwen2(cfg, {**YARN, "rope_theta": 10000.0}, 4096)
    wrong, _ = ROPE_INIT_FUNCTIONS["yarn"](forgot, torch.device("cpu"))
    assert not torch.allclose(wrong, rotary.inv_freq)


def test_frequencies_below_the_ramp_are_kept_and_above_it_divided_by_the_factor():
    cfg = load_config(["stage=long_context"])
    plain = _rotary(build_model(load_config([]).model)).inv_freq
    switched = _rotary(build_model(cfg.model, cfg.context)).inv_freq
    wavelength = 2 * math.pi / plain
    fast = wavelength < 512 / 32  # turns more than beta_fast times within the original context
    slow = wavelength > 512 / 1  # turns less than beta_slow times
    assert fast.any() and slow.any() and (~fast & ~slow).any()
    torch.testing.assert_close(switched[fast], plain[fast])
    torch.testing.assert_close(switched[slow], plain[slow] / 8)
    ramp = ~fast & ~slow
    assert ((switched[ramp] < plain[ramp]) & (switched[ramp] >= plain[ramp] / 8)).all()


def _plain_checkpoint(path, stage_args=()):
    """A checkpoint of a model built from ``stage_args``' config: its weights and its config, and
    a stale rotary buffer a careless saver might have written."""
    cfg = load_config(list(stage_args))
    model = build_model(cfg.model, cfg.context)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state["model.llm.model.rotary_emb.inv_freq"] = _rotary(model).inv_freq.clone()
    hparams = {"cfg": to_container(cfg), "config_version": 2}
    torch.save({"state_dict": state, "hyper_parameters": hparams, "global_step": 7}, path)
    return model


def test_init_from_switches_the_rotary_buffers_to_those_of_yarn_from_the_start(tmp_path):
    plain = _plain_checkpoint(tmp_path / "plain.ckpt")
    cfg = load_run_config(["stage=long_context", f"init_from={tmp_path / 'plain.ckpt'}"])
    module = NextTokenModule(to_container(cfg))
    module.configure_model()
    fresh = build_model(cfg.model, cfg.context)
    switched, from_start = _rotary(module.model), _rotary(fresh)
    torch.testing.assert_close(switched.inv_freq, from_start.inv_freq)
    torch.testing.assert_close(switched.original_inv_freq, from_start.original_inv_freq)
    assert switched.attention_scaling == from_start.attention_scaling > 1
    assert not torch.allclose(switched.inv_freq, _rotary(plain).inv_freq)
    # the weights are the checkpoint's
    name, weight = next(iter(plain.llm.named_parameters()))
    torch.testing.assert_close(dict(module.model.llm.named_parameters())[name], weight)


def test_sft_after_long_context_inherits_the_switch_and_a_preset_cannot_undo_it(tmp_path, demo_dir):
    ckpt = tmp_path / "long.ckpt"
    # load_run reads the tokenizer the saved config names (a fresh clone has no data/demo)
    _plain_checkpoint(ckpt, ["stage=long_context", f"tokenizer.path={demo_dir}/tokenizer"])
    for extra in ([], ["model=tiny"]):
        cfg = load_run_config(["stage=sft", f"init_from={ckpt}", *extra])
        assert cfg.context.rope.rope_type == "yarn" and cfg.context.rope.factor == 8
        hf = llm_config(cfg.model.llm, cfg.context.rope)
        assert (
            hf.max_position_embeddings == 4096
            and hf.rope_parameters["original_max_position_embeddings"] == 512
        )
        assert cfg.data.seq_len == 256  # the stage's rows; only null means the whole context
    # what generation, evaluation and later stages load is the switched model
    loaded = load_run(ckpt, key="ckpt")
    assert loaded.model.llm.config.max_position_embeddings == 4096
    assert _rotary(loaded.model).rope_type == "yarn"


def test_rows_default_to_the_switched_context_and_longer_rows_are_refused(capsys):
    assert load_run_config(["stage=long_context"]).data.seq_len == 4096
    assert load_run_config(["stage=long_context", "data.seq_len=2048"]).data.seq_len == 2048
    big = load_run_config(["stage=long_context", "model=bluelm_3b"])
    assert big.data.seq_len == 32768
    dry_run(load_config(["stage=long_context", "model=bluelm_3b", "dry_run=true"]))
    printed = capsys.readouterr().out
    for shown in ("rope_type: yarn", "factor: 8", "max_position_embeddings: 4096", "seq_len: 32768"):
        assert shown in printed, shown
    with pytest.raises(ConfigError, match="data.seq_len=1024 exceeds the model's context of 512"):
        load_run_config(["data.seq_len=1024"])


def test_beyond_keeps_only_the_targets_past_the_original_context():
    labels = torch.tensor([[5, 6, 7, 8, 9], [1, 2, IGNORE_INDEX, 4, 5]])
    kept = beyond(labels, None, 3)
    assert kept.tolist() == [[-100, -100, -100, 8, 9], [-100, -100, -100, 4, 5]]
    packed = torch.tensor([[0, 1, 2, 3, 0], [0, 1, 0, 1, 2]])
    assert beyond(labels, packed, 2).tolist() == [[-100, -100, 7, 8, -100], [-100, -100, -100, -100, 5]]


def test_a_long_context_run_reports_the_loss_beyond_the_original_context(demo_dir, tmp_path):
    t, v = SMALL.train_shards - 1, SMALL.val_shards - 1
    args = ["stage=long_context", f"tokenizer.path={demo_dir}/tokenizer", f"data.demo_dir={demo_dir}"]
    for name in ("long", "passkey", "image_text", "text", "cot"):
        args += [
            f"data.sources.{name}.train={demo_dir}/train/{name}-{{000000..{t:06d}}}.tar",
            f"data.sources.{name}.val={demo_dir}/val/{name}-{{000000..{v:06d}}}.tar",
        ]
    run_dir = tmp_path / "long"
    args += run_args(run_dir, "data.seq_len=768", "data.batch_size=2", "trainer.max_steps=2")
    summary = fit_stage(load_config(args))
    assert summary["status"] == "ok"
    for key in ("val_loss_long_before", "val_loss_long_after"):
        assert math.isfinite(summary[key]) and summary[key] > 0
    assert load_summary(str(run_dir))["val_loss_long_after"] == summary["val_loss_long_after"]


# ----------------------------------------------------------------------------- passkey prompts


@pytest.mark.parametrize("length", [64, 256, 1000])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_a_passkey_prompt_has_its_exact_length_and_the_needle_at_its_depth(demo_dir, length, depth):
    tok = load_tokenizer(demo_dir / "tokenizer")
    ids = needle.passkey_prompt(tok, length, depth, "48213", random.Random(0))
    assert len(ids) == length - needle.ANSWER_TOKENS
    text = tok.decode(ids)
    assert text.startswith(needle.INTRO) and text.endswith(needle.QUESTION)
    at = text.index(needle.needle("48213"))
    filler = len(text) - len(needle.INTRO) - len(needle.QUESTION) - len(needle.needle("48213"))
    where = (at - len(needle.INTRO)) / max(filler, 1)
    assert abs(where - depth) < 0.1, (where, depth)
    with pytest.raises(ConfigError, match="cannot hold the needle"):
        needle.passkey_prompt(tok, 20, depth, "48213", random.Random(0))


def test_answers_tables_and_heat_map(tmp_path):
    assert needle.answer_of(" 48213. Remember it.") == "48213"
    assert needle.answer_of(" 4821") == "4821"
    rows = [
        needle.PasskeyRow("passkey", n, f, d, acc, 20)
        for n, f in ((256, 0.5), (512, 1.0))
        for d, acc in ((0.0, 1.0), (1.0, 0.5))
    ]
    assert needle.by_length(rows) == {0.5: 0.75, 1.0: 0.75}
    lines = needle.table(rows).splitlines()
    assert lines[0].split() == ["length", "factor", "0.00", "1.00", "mean"]
    assert lines[1].split() == ["256", "0.5", "1.00", "0.50", "0.75"]
    assert needle.heatmap(rows, tmp_path / "h.png").stat().st_size > 1000


def test_the_demo_prompts_with_the_largest_budget_and_answer_fit_the_original_context(demo_dir):
    """The tiny preset's 512 tokens hold every demo evaluation prompt in think mode, the largest
    budget, the forced end of thinking and the longest answer."""
    from lit_bluelm.demo import EVAL_BUDGETS
    from lit_bluelm.evaluate import EvaluateArgs
    from lit_bluelm.evaluation import DEMO_TASKS, build_prompts, load_task
    from lit_bluelm.generation import GenerationConfig
    from lit_bluelm.processor import BlueLMProcessor
    from lit_bluelm.tokenizer import THINK_END

    cfg = load_config([])
    tok = load_tokenizer(demo_dir / "tokenizer")
    processor = BlueLMProcessor.from_config(tok, cfg.model, cfg.sft.think_token_position)
    longest = max(
        len(p.input_ids)
        for task in DEMO_TASKS
        for p in build_prompts(processor, load_task(task, demo_dir), think=True)
    )
    end = GenerationConfig().thinking_end_text + THINK_END + "\n"  # forced when the budget is spent
    forced = len(tok(end, add_special_tokens=False)["input_ids"])
    need = longest + max(EVAL_BUDGETS) + forced + EvaluateArgs().max_answer_tokens
    print(f"longest prompt {longest}, in all {need} tokens")
    assert need <= llm_config(cfg.model.llm).max_position_embeddings == 512, need
