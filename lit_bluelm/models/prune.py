"""Minitron-style pruning: cut a smaller student LLM out of a trained teacher.

Importance is measured on a few calibration batches with forward hooks on the teacher:
  * layers (depth): 1 - cos(hidden state in, hidden state out), averaged over tokens; a layer
    that barely changes its input matters least (ShortGPT's block influence);
  * attention heads: the L2 norm of each head's output (the input of ``o_proj``), summed over
    tokens; heads are kept per key/value group so grouped-query attention stays consistent;
  * MLP channels: the mean absolute activation entering ``down_proj``.
The student keeps the chosen (or most important) layers in their original order and, inside
each, its most important KV groups, query heads per group and MLP channels. The hidden size and
head dimension are not pruned. Works for Llama-style decoders (Llama, Qwen2/3, Mistral): layers
at ``base_model.layers`` with ``self_attn.{q,k,v,o}_proj`` and ``mlp.{gate,up,down}_proj``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence

import torch
from torch import nn
from transformers import PreTrainedModel

from lit_bluelm.errors import ConfigError

_PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass
class Importance:
    layers: torch.Tensor  # [L] 1 - mean cos(in, out)
    heads: torch.Tensor  # [L, H] summed L2 norm of each head's output
    channels: torch.Tensor  # [L, I] summed |activation| entering down_proj


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def _layers(llm: PreTrainedModel) -> nn.ModuleList:
    layers = getattr(llm.base_model, "layers", None)
    if layers is None or not all(_has(layer, p) for layer in layers for p in _PROJ + _MLP):
        raise ConfigError(
            f"distill.init_from_teacher: {type(llm).__name__} is not a Llama-style decoder "
            "(base_model.layers with self_attn.{q,k,v,o}_proj and mlp.{gate,up,down}_proj)"
        )
    return layers


def _dims(cfg) -> Dict[str, int]:
    heads = cfg.num_attention_heads
    return {
        "layers": cfg.num_hidden_layers,
        "hidden": cfg.hidden_size,
        "heads": heads,
        "kv": getattr(cfg, "num_key_value_heads", None) or heads,
        "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
        "inter": cfg.intermediate_size,
    }


@torch.no_grad()
def _run_batches(
    llm: PreTrainedModel, batches: Iterable[Dict[str, torch.Tensor]], state: dict, device
) -> None:
    """The LLM (in eval mode) over the calibration batches; ``state`` holds the real-token mask
    the hooks read, and the token count."""
    was_training = llm.training
    llm.eval()
    try:
        for batch in batches:
            mask = batch.get("attention_mask")
            state["mask"] = mask.to(device).bool() if mask is not None else None
            state["tokens"] += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
            position_ids = batch.get("position_ids")
            llm.base_model(
                input_ids=batch["input_ids"].to(device),
                position_ids=position_ids.to(device) if position_ids is not None else None,
                use_cache=False,
            )
    finally:
        llm.train(was_training)


def measure_importance(llm: PreTrainedModel, batches: Iterable[Dict[str, torch.Tensor]]) -> Importance:
    """Importance of every layer, head and MLP channel of ``llm`` on ``batches`` (``input_ids``,
    optional ``position_ids`` and ``attention_mask`` marking real tokens)."""
    layers = _layers(llm)
    d = _dims(llm.config)
    n_layers = len(layers)
    device = next(llm.parameters()).device
    cos_sum = torch.zeros(n_layers, dtype=torch.float64)
    heads = torch.zeros(n_layers, d["heads"], dtype=torch.float64)
    channels = torch.zeros(n_layers, d["inter"], dtype=torch.float64)
    state = {"mask": None, "tokens": 0}

    def real(x: torch.Tensor) -> torch.Tensor:  # [B, T, ...] -> [tokens, ...] of real tokens
        return x[state["mask"]] if state["mask"] is not None else x.flatten(0, 1)

    def layer_hook(i):
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(real(x).float(), real(y).float(), dim=-1)
            cos_sum[i] += cos.sum().double().cpu()

        return hook

    def head_hook(i):
        def hook(module, args):
            x = real(args[0]).float()  # [tokens, H * head_dim]
            heads[i] += x.view(x.shape[0], d["heads"], -1).norm(dim=-1).sum(0).double().cpu()

        return hook

    def channel_hook(i):
        def hook(module, args):
            channels[i] += real(args[0]).float().abs().sum(0).double().cpu()

        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(layer_hook(i), with_kwargs=True))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(head_hook(i)))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(channel_hook(i)))
    try:
        _run_batches(llm, batches, state, device)
    finally:
        for h in handles:
            h.remove()
    if state["tokens"] == 0:
        raise ConfigError("distill.init_from_teacher: the calibration batches hold no tokens")
    return Importance(1.0 - cos_sum / state["tokens"], heads, channels)


def reduce_importance(imp: Importance) -> Importance:
    """Sum importance over data-parallel ranks, so every rank prunes the same way."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for t in (imp.layers, imp.heads, imp.channels):
            buf = t.to(torch.float32)
            if torch.distributed.get_backend() == "nccl":
                buf = buf.cuda()
            torch.distributed.all_reduce(buf)
            t.copy_(buf.cpu())
    return imp


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, in ascending index order (ties: lower index first)."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return torch.tensor(sorted(order[:k]), dtype=torch.long)


def check_prunable(teacher_cfg, student_cfg, keep_layers: Optional[Sequence[int]] = None) -> None:
    """Can the student (a transformers config) be cut out of the teacher? Checked at start-up."""
    t, s = _dims(teacher_cfg), _dims(student_cfg)
    for key in ("hidden", "head_dim"):
        if s[key] != t[key]:
            raise ConfigError(
                f"distill.init_from_teacher: student {key} {s[key]} != teacher {t[key]} (not pruned)"
            )
    for what, small, big in (
        ("num_hidden_layers", s["layers"], t["layers"]),
        ("num_key_value_heads", s["kv"], t["kv"]),
        ("query heads per KV group", s["heads"] // s["kv"], t["heads"] // t["kv"]),
        ("intermediate_size", s["inter"], t["inter"]),
    ):
        if small > big:
            raise ConfigError(f"distill.init_from_teacher: student {what} {small} > teacher {big}")
    if keep_layers is not None:
        chosen, keep, total = list(keep_layers), s["layers"], t["layers"]
        if len(chosen) != keep or len(set(chosen)) != keep or not all(0 <= i < total for i in chosen):
            raise ConfigError(
                f"distill.keep_layers: need {keep} distinct teacher layers in [0, {total}), got {chosen}"
            )


def choose_layers(imp: Importance, keep: int, keep_layers: Optional[Sequence[int]]) -> List[int]:
    if keep_layers is not None:  # validated by check_prunable
        return sorted(keep_layers)
    return _top(imp.layers, keep).tolist()


@torch.no_grad()
def prune_into(
    teacher: PreTrainedModel,
    student: PreTrainedModel,
    imp: Importance,
    keep_layers: Optional[Sequence[int]] = None,
) -> Dict[str, object]:
    """Copy the teacher's most important structure into ``student`` (built at its target
    shapes). Returns what was kept (teacher layer indices, heads and channels per layer)."""
    check_prunable(teacher.config, student.config, keep_layers)
    t, s = _dims(teacher.config), _dims(student.config)
    t_layers, s_layers = _layers(teacher), _layers(student)
    g_t, g_s = t["heads"] // t["kv"], s["heads"] // s["kv"]
    layers = choose_layers(imp, s["layers"], keep_layers)
    hd = t["head_dim"]
    report: Dict[str, object] = {"layers": layers, "heads": [], "channels": []}
    for j, i in enumerate(layers):
        groups = _top(imp.heads[i].view(t["kv"], g_t).sum(1), s["kv"])
        q_heads = torch.cat([g * g_t + _top(imp.heads[i].view(t["kv"], g_t)[g], g_s) for g in groups])
        q_rows = (q_heads[:, None] * hd + torch.arange(hd)).flatten()
        kv_rows = (groups[:, None] * hd + torch.arange(hd)).flatten()
        ch = _top(imp.channels[i], s["inter"])
        rows = {"self_attn.q_proj": q_rows, "self_attn.k_proj": kv_rows, "self_attn.v_proj": kv_rows}
        rows |= {"mlp.gate_proj": ch, "mlp.up_proj": ch}
        cols = {"self_attn.o_proj": q_rows, "mlp.down_proj": ch}
        _copy_layer(t_layers[i], s_layers[j], rows, cols)
        report["heads"].append(q_heads.tolist())
        report["channels"].append(len(ch))
    # everything outside the layers (embeddings, final norm, output head) has unchanged shapes
    layer_prefix = f"{_prefix(student)}layers."
    own = {k: v for k, v in student.state_dict().items() if not k.startswith(layer_prefix)}
    theirs = teacher.state_dict()
    for key, value in own.items():
        value.copy_(theirs[key])
    return report


def _prefix(llm: PreTrainedModel) -> str:
    for name, module in llm.named_modules():
        if module is llm.base_model:
            return f"{name}." if name else ""
    raise AssertionError("base_model not found")


def _copy_layer(
    src: nn.Module, dst: nn.Module, rows: Dict[str, torch.Tensor], cols: Dict[str, torch.Tensor]
) -> None:
    theirs = src.state_dict()
    for key, value in dst.state_dict().items():
        module, _, kind = key.rpartition(".")
        source = theirs[key]
        if module in rows:  # output features selected (weight rows, bias entries)
            source = source.index_select(0, rows[module].to(source.device))
        elif module in cols and kind == "weight":  # input features selected
            source = source.index_select(1, cols[module].to(source.device))
        if source.shape != value.shape:
            raise ConfigError(
                f"distill.init_from_teacher: cannot prune {key}: {tuple(source.shape)} -> {tuple(value.shape)}"
            )
        value.copy_(source)
