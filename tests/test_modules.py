"""Each stage module on a tiny hand-made batch: its training loss equals the objective computed
naively on the model's full logits, and validation reports the plain CE."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from lit_bluelm.config import load_config, to_container
from lit_bluelm.labels import IGNORE_INDEX
from lit_bluelm.modules import STAGE_MODULES, DistillModule, NextTokenModule
from lit_bluelm.objectives import next_token_loss


def _module(cls, *args):
    cfg = load_config(["trainer.accelerator=cpu", "model.image_token_id=2", *args])
    torch.manual_seed(0)
    module = cls(to_container(cfg))
    module.configure_model()
    return module


def _batch(vocab=1024):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(8, vocab, (2, 12), generator=g)
    labels = ids.clone()
    labels[0, :4] = IGNORE_INDEX  # e.g. a prompt
    labels[1, -3:] = IGNORE_INDEX  # padding
    return {"input_ids": ids, "labels": labels, "source": ["text", "image_text"]}


def _quiet_step(fn, *args):
    with warnings.catch_warnings():  # self.log outside a Trainer warns and does nothing
        warnings.simplefilter("ignore")
        return fn(*args)


def test_stage_modules_are_registered():
    from lit_bluelm.modules import RewardModule, RLModule

    assert STAGE_MODULES == {
        "next_token": NextTokenModule,
        "distill": DistillModule,
        "reward": RewardModule,
        "rl": RLModule,
    }
    for cls in (NextTokenModule, DistillModule):
        assert cls.best_metric == "val/loss" and cls.best_mode == "min"
    assert (RewardModule.best_metric, RewardModule.best_mode) == ("val/accuracy", "max")


def test_next_token_module_trains_and_validates_on_plain_ce():
    module = _module(NextTokenModule)
    batch = _batch()
    loss = _quiet_step(module.training_step, batch, 0)
    expected, count = next_token_loss(module.model(batch["input_ids"]), batch["labels"])
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert int(count) == 2 * 11 - 3 - 3 and loss.requires_grad
    loss.backward()
    assert module.model.llm.get_output_embeddings().weight.grad.abs().sum() > 0
    with torch.no_grad():
        _quiet_step(module.validation_step, batch, 0)
    torch.testing.assert_close(module.val_loss.compute(), expected.detach(), rtol=1e-5, atol=1e-6)
    # per source: row 0 is "text", row 1 "image_text"
    row0, _ = next_token_loss(module.model(batch["input_ids"][:1]), batch["labels"][:1])
    torch.testing.assert_close(
        module.val_source_loss["src_text"].compute(), row0.detach(), rtol=1e-5, atol=1e-6
    )


def test_validation_counts_each_packed_document_for_its_own_source():
    from datamodules.collate import Collator
    from datamodules.packing import join

    module = _module(NextTokenModule, "stage=reasoning")  # sources image_text, text, cot, passkey
    g = torch.Generator().manual_seed(2)
    docs = [torch.randint(8, 1024, (n,), generator=g) for n in (5, 7, 6)]
    sources = ("text", "cot", "text")
    first, second, third = (
        {"input_ids": d, "labels": d.clone(), "source": s} for d, s in zip(docs, sources, strict=True)
    )
    rows = [join([first, second]), third]
    batch = Collator(pad_token_id=0, pad_to_multiple=8)(rows)
    with torch.no_grad():
        _quiet_step(module.validation_step, batch, 0)
        alone = [next_token_loss(module.model(d[None]), d[None]) for d in docs]
    # "cot" is the second document of the packed row: its own loss, not the row's
    torch.testing.assert_close(module.val_source_loss["src_cot"].compute(), alone[1][0], rtol=1e-5, atol=1e-6)
    text = (alone[0][0] * alone[0][1] + alone[2][0] * alone[2][1]) / (alone[0][1] + alone[2][1])
    torch.testing.assert_close(module.val_source_loss["src_text"].compute(), text, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("alpha, temperature", [(0.5, 1.0), (0.2, 2.0)])
def test_distill_module_loss_is_alpha_ce_plus_scaled_kl(alpha, temperature):
    args = [
        "stage=text",
        "distill.teacher=tiny_teacher",
        f"distill.alpha={alpha}",
        f"distill.temperature={temperature}",
    ]
    module = _module(DistillModule, *args)
    assert module.teacher is not None and not any(p.requires_grad for p in module.teacher.parameters())
    batch = _batch()
    loss = _quiet_step(module.training_step, batch, 0)
    with torch.no_grad():
        student = module.model(batch["input_ids"])[:, :-1]
        teacher = module.teacher(input_ids=batch["input_ids"]).logits[:, :-1]
    keep = batch["labels"][:, 1:] != IGNORE_INDEX
    s, t = student[keep] / temperature, teacher[keep] / temperature
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
    ce = F.cross_entropy(student[keep], batch["labels"][:, 1:][keep])
    expected = alpha * ce + (1 - alpha) * temperature**2 * kl
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    assert math.isfinite(float(loss)) and loss.requires_grad
