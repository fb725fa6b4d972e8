"""Causal self-attention: RoPE, QK-norm, ``scaled_dot_product_attention``, an optional key/value cache
(:class:`KVCache`); and the parameter-free RMSNorm every block uses."""

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


class KVCache:
    """One attention layer's keys and values of the positions a batch has seen, (B, H, t, hd) each, in
    buffers of ``seq_len`` positions: extending it writes the new positions only, so running a sequence
    in pieces (or a byte at a time) copies nothing it already holds."""

    def __init__(self, k: torch.Tensor | None = None, v: torch.Tensor | None = None, length: int = 0):
        self.k, self.v, self.length = k, v, length

    def extend(self, k: torch.Tensor, v: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Append (B, H, T, hd) keys and values; return every position's so far."""
        if self.k is None:
            self.k, self.v = (t.new_empty(*t.shape[:2], capacity, t.shape[3]) for t in (k, v))
        end = self.length + k.shape[2]
        self.k[:, :, self.length:end], self.v[:, :, self.length:end] = k, v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def rows(self, keep: torch.Tensor) -> KVCache:
        """The cache of the sequences ``keep`` (a bool mask or indices) selects."""
        return KVCache(self.k[keep], self.v[keep], self.length) if self.k is not None else KVCache()

    @staticmethod
    def join(caches: list[KVCache]) -> KVCache:
        """One cache holding the sequences of several, in order; they hold the same positions."""
        if len({c.length for c in caches}) > 1:
            raise ValueError("KVCache.join: the caches hold different numbers of positions")
        return KVCache(torch.cat([c.k for c in caches]), torch.cat([c.v for c in caches]), caches[0].length)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.seq_len = cfg.seq_len
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """``cache``: this layer's keys and values of the positions before ``x``; they are extended by
        ``x``'s and ``x`` attends to all of them."""
        B, T, C = x.shape
        t = cache.length if cache else 0
        # (B, T, 3C) -> 3 × (B, H, T, hd)
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(norm(q), cos[t:t + T], sin[t:t + T]), apply_rope(norm(k), cos[t:t + T], sin[t:t + T])
        if cache is not None:
            k, v = cache.extend(k, v, self.seq_len)
        # With a cache, query i sits at position t + i and sees every key up to it.
        mask = None if t == 0 or T == 1 else torch.ones(T, t + T, dtype=torch.bool, device=x.device).tril(t)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=t == 0)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))
