"""Causal self-attention: RoPE, QK-norm, ``scaled_dot_product_attention``, an optional KV cache;
and the parameter-free RMSNorm every block uses."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from hst.config import ModelConfig


def norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],))


def rope_tables(seq_len: int, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)  # (T, hd/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, hd); rotates pairs (x[..., :hd/2], x[..., hd/2:])."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        """``cache``: this layer's keys and values of the positions before ``x`` (``"k"``, ``"v"``,
        (B, H, t, hd)); they are extended by ``x``'s and ``x`` attends to all of them."""
        B, T, C = x.shape
        t = cache["k"].shape[2] if cache else 0
        # (B, T, 3C) -> 3 × (B, H, T, hd)
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(norm(q), cos[t:t + T], sin[t:t + T]), apply_rope(norm(k), cos[t:t + T], sin[t:t + T])
        if cache is not None:
            if t:
                k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
            cache["k"], cache["v"] = k, v
        # With a cache, query i sits at position t + i and sees every key up to it.
        mask = None if t == 0 or T == 1 else torch.ones(T, t + T, dtype=torch.bool, device=x.device).tril(t)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=t == 0)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))
