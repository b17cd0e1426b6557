"""The generation engine's direct decode step for Llama-style decoders (see :class:`FastDecoder`)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


class FastDecoder:
    """One decode step of a Llama-style decoder (Llama, Qwen2, Mistral: RMSNorm, rotary
    attention with grouped KV heads, SiLU-gated MLP; no sliding window, no q/k norms) over a
    preallocated KV cache, calling the layers' weights directly: no per-step mask building, cache
    concatenation or module dispatch, which dominate decoding when the model is small. The prompt
    is prefilled by the model's own forward; :meth:`supports` says when this path applies (the
    generic path runs the model's forward every step). Tested token for token against it."""

    def __init__(self, base: torch.nn.Module, batch: int, max_len: int) -> None:
        self.base = base
        first = base.layers[0].self_attn
        self.head_dim = first.head_dim
        self.heads = first.q_proj.out_features // self.head_dim
        self.kv_heads = first.k_proj.out_features // self.head_dim
        weight = first.q_proj.weight
        shape = (batch, self.kv_heads, max_len, self.head_dim)
        self.keys = [weight.new_zeros(shape) for _ in base.layers]
        self.values = [weight.new_zeros(shape) for _ in base.layers]
        self.length = 0

    @staticmethod
    def supports(base: torch.nn.Module) -> bool:
        from transformers.activations import SiLUActivation

        cfg = getattr(base, "config", None)
        layers = getattr(base, "layers", None)
        if cfg is None or not layers or not hasattr(base, "rotary_emb") or not hasattr(base, "norm"):
            return False
        # a sliding window is applied unless the config switches it off (Qwen2's flag; Mistral
        # has none): this path attends to every cached token
        if getattr(cfg, "sliding_window", None) is not None and getattr(cfg, "use_sliding_window", True):
            return False
        if any(t != "full_attention" for t in getattr(cfg, "layer_types", None) or ()):
            return False
        for layer in layers:
            attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
            parts = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
            parts += [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
            if any(not isinstance(m, torch.nn.Linear) for m in parts) or hasattr(attn, "q_norm"):
                return False
            if not isinstance(getattr(mlp, "act_fn", None), (SiLUActivation, torch.nn.SiLU)):
                return False
            norms = (layer.input_layernorm, layer.post_attention_layernorm)
            if any(not hasattr(n, "variance_epsilon") for n in norms):
                return False
            if abs(attn.scaling - attn.head_dim**-0.5) > 1e-9:
                return False
        return hasattr(base.norm, "variance_epsilon")

    def load(self, cache: Any, length: int) -> None:
        """Take over the prompt's keys and values from the prefill's transformers cache."""
        for i, layer in enumerate(cache.layers):
            self.keys[i][:, :, :length] = layer.keys
            self.values[i][:, :, :length] = layer.values
        self.length = length

    @staticmethod
    def _norm(x: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
        # as transformers' RMSNorm: in float32, then the weight in the input's dtype
        out = F.rms_norm(x.float(), (x.shape[-1],), eps=module.variance_epsilon)
        return module.weight * out.to(x.dtype)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def step(self, x: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``x`` [B, 1, D] embeddings of the new tokens at ``position_ids`` [B, 1]; ``mask`` [B, L]
        (bool, L = tokens so far + 1). Returns the final hidden states [B, D]."""
        b, t = x.shape[0], self.length
        cos, sin = self.base.rotary_emb(x, position_ids)
        cos, sin = cos[:, None], sin[:, None]  # [B, 1, 1, hd]
        attn_mask = mask[:, None, None, :]
        for i, layer in enumerate(self.base.layers):
            attn = layer.self_attn
            h = self._norm(x, layer.input_layernorm)
            q = F.linear(h, attn.q_proj.weight, attn.q_proj.bias).view(b, 1, self.heads, self.head_dim)
            k = F.linear(h, attn.k_proj.weight, attn.k_proj.bias).view(b, 1, self.kv_heads, self.head_dim)
            v = F.linear(h, attn.v_proj.weight, attn.v_proj.bias).view(b, 1, self.kv_heads, self.head_dim)
            q = self._rotate(q.transpose(1, 2), cos, sin)
            self.keys[i][:, :, t : t + 1] = self._rotate(k.transpose(1, 2), cos, sin)
            self.values[i][:, :, t : t + 1] = v.transpose(1, 2)
            out = F.scaled_dot_product_attention(
                q,
                self.keys[i][:, :, : t + 1],
                self.values[i][:, :, : t + 1],
                attn_mask=attn_mask,
                scale=attn.scaling,
                enable_gqa=self.heads != self.kv_heads,
            )
            x = x + F.linear(out.transpose(1, 2).reshape(b, 1, -1), attn.o_proj.weight, attn.o_proj.bias)
            h = self._norm(x, layer.post_attention_layernorm)
            mlp = layer.mlp
            gate = F.silu(F.linear(h, mlp.gate_proj.weight, mlp.gate_proj.bias))
            up = F.linear(h, mlp.up_proj.weight, mlp.up_proj.bias)
            x = x + F.linear(gate * up, mlp.down_proj.weight, mlp.down_proj.bias)
        self.length = t + 1
        return self._norm(x, self.base.norm)[:, -1]
