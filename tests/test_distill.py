"""Stage 1: chunked CE/KD math, pruning init, teacher checks and the text stage end to end."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import train
from lit_bluelm.config import ConfigError, load_config
from lit_bluelm.frozen import load_frozen_llm, resolve_source
from lit_bluelm.models.llm import build_from_config
from lit_bluelm.models.prune import Importance, measure_importance, prune_into
from lit_bluelm.modules.distill import check_teacher
from lit_bluelm.objectives import (
    Head,
    KDOptions,
    next_token_head_loss,
    next_token_loss,
)
from lit_bluelm.objectives import distill_linear_loss as chunked_linear_loss
from lit_bluelm.objectives import naive_distill_loss as naive_linear_loss
from lit_bluelm.tokenizer import load_tokenizer
from tests.helpers import SMALL, scalars, text_args

# ----------------------------------------------------------------------------- loss math

VARIANTS = [
    KDOptions(alpha=0.5),
    KDOptions(alpha=0.3, temperature=2.0),
    KDOptions(alpha=0.2, temperature=1.5, reverse=True),
    KDOptions(alpha=0.0, top_k=5),
    KDOptions(alpha=0.5, top_k=7, reverse=True),
]


@pytest.mark.parametrize("opts", VARIANTS, ids=str)
@pytest.mark.parametrize("chunk_size", [1, 8, 64])
def test_chunked_loss_and_gradients_match_the_naive_computation(opts, chunk_size):
    g = torch.Generator().manual_seed(0)
    n, d, v = 37, 16, 50
    hidden = torch.randn(n, d, generator=g, requires_grad=True)
    weight = torch.randn(v, d, generator=g, requires_grad=True)
    bias = torch.randn(v, generator=g, requires_grad=True)
    teacher = (torch.randn(n, 24, generator=g), Head(torch.randn(v, 24, generator=g)))
    targets = torch.randint(0, v, (n,), generator=g)
    results = []
    for fn, extra in ((chunked_linear_loss, {"chunk_size": chunk_size}), (naive_linear_loss, {})):
        for x in (hidden, weight, bias):
            x.grad = None
        out = fn(hidden, Head(weight, bias), targets, *teacher, opts=opts, **extra)
        (2.0 * out.loss).backward()  # a non-unit upstream gradient reaches every input
        results.append((out, [x.grad.clone() for x in (hidden, weight, bias)]))
    (chunked, grads_c), (naive, grads_n) = results
    for a, b in zip(chunked[:3], naive[:3], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads_c, grads_n, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert chunked.kd > 0 and int(chunked.count) == n


def test_no_grad_path_and_bf16_autocast_agree_with_naive():
    g = torch.Generator().manual_seed(2)
    n, d, v = 40, 16, 64
    hidden = torch.randn(n, d, generator=g, requires_grad=True)
    weight = torch.randn(v, d, generator=g, requires_grad=True)
    teacher = (
        torch.randn(n, 8, generator=g),
        Head(torch.randn(v, 8, generator=g), torch.randn(v, generator=g)),
    )
    targets = torch.randint(0, v, (n,), generator=g)
    opts = KDOptions(alpha=0.4, temperature=2.0)
    with torch.no_grad():  # validation: no gradient buffers, same values
        fast = chunked_linear_loss(hidden, Head(weight), targets, *teacher, opts=opts, chunk_size=7)
    ref = naive_linear_loss(hidden, Head(weight), targets, *teacher, opts=opts)
    for a, b in zip(fast[:3], ref[:3], strict=True):
        torch.testing.assert_close(a, b.detach())
    assert not fast.loss.requires_grad
    grads = []
    for fn, extra in ((chunked_linear_loss, {"chunk_size": 16}), (naive_linear_loss, {})):
        hidden.grad = weight.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(hidden, Head(weight), targets, *teacher, opts=opts, **extra)
        out.loss.backward()
        grads.append((out.loss.detach(), hidden.grad.clone(), weight.grad.clone()))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=2e-2)


def test_hand_made_values():
    # one token, vocabulary 2, identity head: logits are the hidden state itself
    head = Head(torch.eye(2))
    student = torch.tensor([[0.0, math.log(3.0)]])  # p = (1/4, 3/4)
    teacher = torch.tensor([[0.0, 0.0]])  # p = (1/2, 1/2)
    target = torch.tensor([1])
    ce_only = chunked_linear_loss(student, head, target)
    assert ce_only.loss.item() == pytest.approx(-math.log(0.75), abs=1e-6) and ce_only.kd.item() == 0
    out = chunked_linear_loss(student, head, target, teacher, head, KDOptions(alpha=0.25))
    forward_kl = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert out.kd.item() == pytest.approx(forward_kl, abs=1e-6)
    assert out.loss.item() == pytest.approx(0.25 * -math.log(0.75) + 0.75 * forward_kl, abs=1e-6)
    rev = chunked_linear_loss(student, head, target, teacher, head, KDOptions(reverse=True))
    reverse_kl = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert rev.kd.item() == pytest.approx(reverse_kl, abs=1e-6)
    # temperature 2: KL of the softened distributions, scaled by T^2
    soft = chunked_linear_loss(student, head, target, teacher, head, KDOptions(temperature=2.0))
    q = F.softmax(student / 2, -1)[0]
    expected = 4.0 * float((0.5 * torch.log(0.5 / q)).sum())
    assert soft.kd.item() == pytest.approx(expected, abs=1e-6)
    # a student equal to its teacher has nothing to learn from it
    same = chunked_linear_loss(student, head, target, student, head)
    assert abs(same.kd.item()) < 1e-6


def test_chunked_ce_equals_next_token_loss_on_logits():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 9, 8, generator=g)
    weight = torch.randn(30, 8, generator=g)
    labels = torch.randint(0, 30, (2, 9), generator=g)
    labels[0, :3] = -100
    lin = torch.nn.Linear(8, 30, bias=False)
    lin.weight.data = weight
    parts = next_token_head_loss(labels, chunk_size=4)(hidden, lin)
    loss, count = next_token_loss(hidden @ weight.T, labels)
    torch.testing.assert_close(parts.loss, loss)
    assert int(parts.count) == int(count) == 14


# ----------------------------------------------------------------------------- pruning


def _llm(**overrides):
    cfg = copy.deepcopy(load_config([]).model.llm)
    cfg.config.update(overrides)
    torch.manual_seed(0)
    return build_from_config(cfg).eval()


TEACHER = dict(num_hidden_layers=6, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)


def test_width_pruning_keeps_the_paths_that_carry_signal():
    teacher = _llm(**TEACHER)
    with torch.no_grad():  # dead MLP channels 32.. and a dead KV group 0 (heads 0 and 1) everywhere
        for layer in teacher.model.layers:
            layer.mlp.up_proj.weight[32:] = 0
            layer.self_attn.v_proj.weight[:32] = 0
            layer.self_attn.v_proj.bias[:32] = 0
    # one KV group and ONE query head per group (the teacher has two): the group offset matters
    student = _llm(
        num_hidden_layers=6, intermediate_size=32, num_attention_heads=1, num_key_value_heads=1, head_dim=32
    )
    ids = torch.randint(0, 1000, (2, 12))
    importance = measure_importance(teacher, [{"input_ids": ids}])
    assert importance.channels.shape == (6, 64) and importance.heads.shape == (6, 4)
    assert (importance.heads[:, :2] == 0).all() and (importance.heads[:, 2:] > 0).all()
    report = prune_into(teacher, student, importance)
    assert report["channels"] == [32] * 6
    kept = [h for (h,) in report["heads"]]
    assert all(h == 2 + int(importance.heads[i, 3] > importance.heads[i, 2]) for i, h in enumerate(kept))
    layer = student.model.layers[0]
    assert layer.self_attn.q_proj.weight.shape == (32, 128) and layer.self_attn.k_proj.weight.shape == (
        32,
        128,
    )
    assert layer.mlp.down_proj.weight.shape == (128, 32)
    # reference: the teacher with every dropped head silenced at o_proj; the dead paths carry
    # nothing, so the pruned student computes exactly what it computes
    reference = copy.deepcopy(teacher)
    with torch.no_grad():
        for layer, h in zip(reference.model.layers, kept, strict=True):
            keep = torch.zeros(128, dtype=torch.bool)
            keep[h * 32 : (h + 1) * 32] = True
            layer.self_attn.o_proj.weight[:, ~keep] = 0
        torch.testing.assert_close(student(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-5)


def test_depth_pruning_equals_the_teacher_without_the_dropped_layers():
    teacher = _llm(**TEACHER)
    student = _llm(**(TEACHER | {"num_hidden_layers": 3}))
    ids = torch.randint(0, 1000, (1, 10))
    report = prune_into(
        teacher, student, measure_importance(teacher, [{"input_ids": ids}]), keep_layers=[4, 0, 2]
    )
    assert report["layers"] == [0, 2, 4]
    reference = copy.deepcopy(teacher)
    reference.model.layers = torch.nn.ModuleList(teacher.model.layers[i] for i in (0, 2, 4))
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, reference(ids).logits)


def test_least_important_layers_are_dropped():
    imp = Importance(torch.tensor([0.9, 0.1, 0.5, 0.05]), torch.ones(4, 4), torch.ones(4, 64))
    teacher, student = (
        _llm(**(TEACHER | {"num_hidden_layers": 4})),
        _llm(**(TEACHER | {"num_hidden_layers": 2})),
    )
    assert prune_into(teacher, student, imp)["layers"] == [0, 2]


def test_pruning_refuses_a_student_larger_than_its_teacher():
    teacher, student = _llm(**TEACHER), _llm(**(TEACHER | {"intermediate_size": 128}))
    imp = measure_importance(teacher, [{"input_ids": torch.tensor([[1, 2, 3]])}])
    with pytest.raises(ConfigError, match="intermediate_size 128 > teacher 64"):
        prune_into(teacher, student, imp)
    with pytest.raises(ConfigError, match="keep_layers"):
        prune_into(teacher, _llm(**(TEACHER | {"num_hidden_layers": 2})), imp, keep_layers=[0, 9])


# ----------------------------------------------------------------------------- teacher checks


def test_teacher_with_another_vocabulary_or_tokenizer_is_refused(demo_dir, tmp_path):
    tokenizer = load_tokenizer(demo_dir / "tokenizer")
    with pytest.raises(ConfigError, match="vocabulary has 1024 entries, the student's 2048"):
        check_teacher(resolve_source("tiny_teacher", "distill.teacher"), 2048, tokenizer)
    # a Hugging Face directory whose tokenizer maps tokens to other ids
    from lit_bluelm.tokenizer import train_tokenizer

    teacher_dir = tmp_path / "hf_teacher"
    _llm().save_pretrained(teacher_dir)
    train_tokenizer(["completely different words here"] * 50, SMALL.vocab_size, teacher_dir)
    with pytest.raises(ConfigError, match="tokenizer .* differs from tokenizer.path"):
        check_teacher(resolve_source(str(teacher_dir), "distill.teacher"), 1024, tokenizer)
    with pytest.raises(ConfigError, match="distill.teacher: .* not a model preset"):
        resolve_source(str(tmp_path / "nowhere"), "distill.teacher")


def test_quantized_teacher_needs_a_gpu_and_a_hf_directory():
    with pytest.raises(ConfigError, match="distill.quantize needs a Hugging Face directory"):
        load_frozen_llm(
            resolve_source("tiny_teacher", "distill.teacher"), torch.float32, "8bit", "distill.quantize"
        )


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def teacher_ckpt(demo_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("teacher") / "run"
    cfg = load_config(
        text_args(demo_dir, run_dir, "module=next_token", "model=tiny_teacher", "trainer.max_steps=4")
    )
    return train.run(cfg)["last_ckpt"]


def test_text_stage_distils_packs_and_keeps_the_teacher_out_of_checkpoints(demo_dir, tmp_path, teacher_ckpt):
    run_dir = tmp_path / "student"
    args = text_args(demo_dir, run_dir, f"distill.teacher={teacher_ckpt}", "trainer.max_steps=3")
    summary = train.run(
        load_config(args + ["distill.init_from_teacher=true", "distill.calibration_batches=2"])
    )
    tags = scalars(run_dir)
    for tag in ("train/loss", "train/ce_loss", "train/kd_loss", "data/packing_efficiency", "val/loss"):
        assert tag in tags, sorted(tags)
    assert min(v for _, v in tags["data/packing_efficiency"]) > 0.9
    assert all(v > 0 for _, v in tags["train/kd_loss"])
    ckpt = torch.load(summary["last_ckpt"], weights_only=True, map_location="cpu")
    assert {k.split(".")[1] for k in ckpt["state_dict"]} == {"llm"}  # no teacher, no vision
    # resume continues the distillation run
    resume = args[:-1] + [
        "distill.init_from_teacher=true",
        "trainer.max_steps=5",
        f"resume_from={summary['last_ckpt']}",
    ]
    more = train.run(load_config(resume))  # resuming skips pruning and continues the run
    assert more["global_step"] == 5


def test_pruned_student_starts_closer_to_its_teacher_than_a_random_one(demo_dir, tmp_path, teacher_ckpt):
    common = [f"distill.teacher={teacher_ckpt}", "trainer.max_steps=1", "optim.lr.llm=1e-9"]
    pruned = train.run(
        load_config(text_args(demo_dir, tmp_path / "a", *common, "distill.init_from_teacher=true"))
    )
    scratch = train.run(load_config(text_args(demo_dir, tmp_path / "b", *common)))
    assert pruned["val_loss_before"] < scratch["val_loss_before"]


def test_bad_distillation_settings_stop_at_start_up(demo_dir, tmp_path, capsys):
    cases = [
        (["distill.teacher=tiny_teacher", "distill.quantize=8bit"], "Hugging Face directory"),
        (
            ["distill.teacher=tiny", "distill.init_from_teacher=true", "model=tiny_teacher"],
            "num_hidden_layers",
        ),
        (["distill.keep_layers=[0,1]"], "only applies with distill.init_from_teacher"),
        (["module=next_token", "distill.init_from_teacher=true"], "needs module=distill"),
        (["model.llm.attn_implementation=flash_attention_2"], "attend across documents"),
        (["distill.init_from_teacher=true", "distill.quantize=4bit"], "quantize=none"),
    ]
    for extra, message in cases:
        # max_steps=1: a case that wrongly passes the checks ends quickly
        assert train.main(text_args(demo_dir, tmp_path / "z", "trainer.max_steps=1", *extra)) == 2, extra
        assert message in capsys.readouterr().err, extra


def test_distill_without_teacher_or_on_images_is_refused(demo_dir, tmp_path, capsys):
    assert train.main(text_args(demo_dir, tmp_path / "x")) == 2
    assert "needs distill.teacher" in capsys.readouterr().err
    args = text_args(
        demo_dir, tmp_path / "y", "distill.teacher=tiny_teacher", "data.sources.text.kind=image_text"
    )
    assert train.main(args + ["model.text_only=false"]) == 2
    assert "module=distill trains on text" in capsys.readouterr().err
    assert train.main(args) == 2
    assert "model.text_only has no vision tower" in capsys.readouterr().err
