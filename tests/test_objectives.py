import math

import torch

from lit_bluelm.labels import IGNORE_INDEX
from lit_bluelm.modules.optim import warmup_cosine
from lit_bluelm.objectives import next_token_loss


def test_next_token_loss_exact_on_hand_made_logits():
    # vocab 2; position t predicts labels[t + 1]
    logits = torch.tensor([[[0.0, 0.0], [2.0, 0.0], [0.0, 0.0]]])
    labels = torch.tensor([[IGNORE_INDEX, 0, 1]])
    loss, count = next_token_loss(logits, labels)
    # step 0 -> label 0 with uniform logits: ln 2; step 1 -> label 1 with logits (2, 0): ln(1 + e^2)
    expected = (math.log(2) + math.log(1 + math.e**2)) / 2
    assert count.item() == 2
    assert abs(loss.item() - expected) < 1e-6


def test_next_token_loss_ignores_masked_targets_and_handles_none():
    logits = torch.randn(2, 4, 5, requires_grad=True)
    labels = torch.full((2, 4), IGNORE_INDEX)
    loss, count = next_token_loss(logits, labels)
    assert count.item() == 0 and loss.item() == 0.0
    loss.backward()  # still connected to the graph
    assert logits.grad is not None


def test_warmup_cosine_schedule_values():
    f = warmup_cosine(warmup_steps=10, total_steps=110, min_ratio=0.1)
    assert abs(f(0) - 0.1) < 1e-9 and abs(f(9) - 1.0) < 1e-9
    assert abs(f(10) - 1.0) < 1e-9  # cosine starts at the peak
    assert abs(f(60) - 0.55) < 1e-9  # halfway: min + (1 - min) / 2
    assert abs(f(110) - 0.1) < 1e-9 and abs(f(500) - 0.1) < 1e-9
    flat = warmup_cosine(10, 110, 0.1, cosine=False)
    assert flat(100) == 1.0


def test_adamw8bit_steps_on_param_groups():
    from torch import nn

    from lit_bluelm.modules.optim import OPTIMIZERS

    layer = nn.Linear(64, 64)
    groups = [
        {"name": "llm", "params": [layer.weight], "lr": 1e-2, "weight_decay": 0.1},
        {"name": "llm_no_decay", "params": [layer.bias], "lr": 1e-2, "weight_decay": 0.0},
    ]
    optimizer = OPTIMIZERS["adamw8bit"](groups, betas=(0.9, 0.95), eps=1e-8)
    before = layer.weight.detach().clone()
    layer(torch.randn(4, 64)).pow(2).mean().backward()
    optimizer.step()
    assert not torch.equal(before, layer.weight)
    assert [g["name"] for g in optimizer.param_groups] == ["llm", "llm_no_decay"]
