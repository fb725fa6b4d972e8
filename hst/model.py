"""The HST language model: a decoder-only transformer whose FFN is dense, a learned MoE or HST's
key-routed MoE.

Attention is standard and dense (RoPE, QK-norm, causal ``scaled_dot_product_attention``);
normalisation is parameter-free RMSNorm. ``forward`` returns logits, the loss when targets are
given, and the routing of every token at every layer for the Smart Sampler and the metrics.

A model grown by paths (``grow.select: posterior``) holds the base experts alone (path 0) and, per growth, the
base experts plus that growth's experts and its own output head (:mod:`hst.heads`); ``forward`` runs the path
:mod:`hst.paths` selects per segment, alone or mixed with path 0 by their posterior, or mixes every path
(``GPT.inference``). The path travels as an argument: ``forward(..., path=p)`` runs path ``p`` alone (growth
trains its path this way) or, with a :data:`PATH_MODES` value, that way of running them; below ``forward`` the
same argument, a number or one per sequence, reaches each layer's router."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from hst import paths, selection, sketches
from hst.attention import Attention, KVCache, norm, rope_tables
from hst.config import ModelConfig
from hst.experts import Expert, MoE
from hst.heads import PathHeads
from hst.router import KeyRouter, LearnedRouter, Routing


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, n_experts: int):
        super().__init__()
        self.attn = Attention(cfg)
        self.ffn = Expert(cfg.d_model, cfg.dense_hidden) if cfg.ffn == "dense" else MoE(cfg, n_experts)

    def attend(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        return x + self.attn(norm(x), cos, sin, cache)

    def feed(self, x: torch.Tensor, update_keys: bool, path: int | torch.Tensor) -> tuple[torch.Tensor, Routing | None]:
        if isinstance(self.ffn, MoE):
            y, routing = self.ffn(norm(x), update_keys, path)
        else:
            y, routing = self.ffn(norm(x)), None
        return x + y, routing

    def forward(self, x, cos, sin, update_keys: bool, path: int | torch.Tensor = 0,
                cache: KVCache | None = None) -> tuple[torch.Tensor, Routing | None]:
        return self.feed(self.attend(x, cos, sin, cache), update_keys, path)


class ModelOutput(NamedTuple):
    logits: torch.Tensor  # (B, T, vocab)
    loss: torch.Tensor | None  # mean cross-entropy in nats when targets are given
    routing: list[Routing | None]  # per layer, tokens flattened to B·T; None for the dense FFN
    path: torch.Tensor  # (B, T) the path whose logits each position got (the most weighted one in the mixture)
    passes: float = 1.0  # model passes per token spent: 1 on one path, P for the mixture, measured for a selection


# The buffers a model stores once it has paths (``GPT.add_path_sketch``).
PATH_BUFFERS = ("path_sketches", "path_select")
# ``forward``'s ``path`` values under which it mixes every path (:func:`hst.paths.mix_paths`), selects one per
# segment (:mod:`hst.paths`), or mixes that one with path 0, whatever ``GPT.inference`` says.
ALL_PATHS, SELECTED_PATHS, SELECTED_AND_BASE = -1, -2, -3
# How a model of several paths runs them, by ``path`` value; ``GPT.inference`` stores its index.
PATH_MODES = {ALL_PATHS: "mixture", SELECTED_PATHS: "select", SELECTED_AND_BASE: "select_base"}
INFERENCE = tuple(PATH_MODES.values())


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, n_experts: list[int] | None = None):
        super().__init__()
        n_experts = list(n_experts) if n_experts is not None else [cfg.n_experts] * cfg.n_layer
        if len(n_experts) != cfg.n_layer:
            raise ValueError(f"n_experts: expected {cfg.n_layer} layer counts, got {len(n_experts)}")
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, n) for n in n_experts)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)  # path 0's, and a path's without its own
        self.path_heads = PathHeads()  # the grown paths' own output heads (hst.heads)
        # Path sketches (hst.sketches.fit_sketch: path 0's, one per domain, then one per later path) and how
        # ``forward`` runs the paths (an index into INFERENCE).
        # Empty, and not in the state dict, until a path is added (``add_path_sketch``): a model without
        # paths stores exactly what it did before paths existed.
        self.register_buffer("path_sketches", torch.zeros(0, 3, dtype=torch.float64), persistent=False)
        self.register_buffer("path_select", torch.tensor(0), persistent=False)
        cos, sin = rope_tables(cfg.seq_len, cfg.d_model // cfg.n_head)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        nn.init.normal_(self.wte.weight, std=std)
        nn.init.normal_(self.lm_head.weight, std=std)
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=std)
            nn.init.normal_(block.attn.proj.weight, std=std / (2 * self.cfg.n_layer) ** 0.5)
            experts = [block.ffn] if isinstance(block.ffn, Expert) else block.ffn.experts
            for expert in experts:
                expert.reset_parameters(std, self.cfg.n_layer)
            if isinstance(block.ffn, MoE) and isinstance(block.ffn.router, LearnedRouter):
                nn.init.normal_(block.ffn.router.gate.weight, std=std)

    @property
    def n_experts(self) -> list[int]:
        """Experts per layer (1 per layer for the dense FFN)."""
        return [len(b.ffn.experts) if isinstance(b.ffn, MoE) else 1 for b in self.blocks]

    @property
    def n_paths(self) -> int:
        """Paths ``forward`` mixes: 1 (the model itself) unless growth added paths."""
        return max((b.ffn.router.n_paths for b in self.blocks if isinstance(b.ffn, MoE)
                    and isinstance(b.ffn.router, KeyRouter)), default=1)

    @property
    def gated(self) -> bool:
        """Whether growth added learned gates (``grow.select: gate``, :mod:`hst.gates`) to any layer."""
        return any(len(b.ffn.router.gate_b) for b in self.blocks
                   if isinstance(b.ffn, MoE) and isinstance(b.ffn.router, KeyRouter))

    @torch.no_grad()
    def add_path_sketch(self, sketch: torch.Tensor) -> None:
        """Append a sketch (hst.sketches.fit_sketch): path 0's first (one per domain), then each path's as it is added."""
        self.path_sketches = sketches.stack([*sketches.unstack(self.path_sketches), sketch]).to(self.path_sketches.device)
        self._non_persistent_buffers_set -= set(PATH_BUFFERS)

    def path_mode(self, path: int | None = None) -> str:
        """What ``forward(..., path=path)`` runs: "one" path (a path number, or a model without paths), or
        one of :data:`INFERENCE` (a :data:`PATH_MODES` value; None: ``inference``)."""
        if self.n_paths == 1 or (path is not None and path not in PATH_MODES):
            return "one"
        return PATH_MODES.get(path, self.inference)

    @property
    def inference(self) -> str:
        """How ``forward`` runs a model of several paths: "mixture" (all), "select" (one per segment,
        hst.paths) or "select_base" (that one mixed with path 0 by their posterior)."""
        return INFERENCE[int(self.path_select)]

    @inference.setter
    def inference(self, mode: str) -> None:
        if mode not in INFERENCE:
            raise ValueError(f"inference: expected one of {', '.join(INFERENCE)}, got {mode!r}")
        self.path_select.fill_(INFERENCE.index(mode))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "path_sketches" in state_dict:  # sketched paths: their number comes with the checkpoint
            self._non_persistent_buffers_set -= set(PATH_BUFFERS)
            self.path_sketches = torch.zeros_like(state_dict[prefix + "path_sketches"], device=self.path_select.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def flops_per_token(self, experts_per_token: list[float] | None = None, all_paths: bool = False) -> float:
        """Forward matmul FLOPs per token of one path (2 per multiply-add; attention over the mean causal context
        of seq_len / 2 tokens); ``all_paths``: of ``forward``'s mixture, which runs every path. ``experts_per_token``:
        per MoE layer, the measured mean (Top-Any with a floor); by default top_k (all under Top-Any)."""
        c, d = self.cfg, self.cfg.d_model
        total = 2 * d * c.vocab_size  # lm_head; the embedding is a lookup
        for layer, block in enumerate(self.blocks):
            total += 2 * 4 * d * d + 2 * 2 * d * c.seq_len / 2  # qkv + proj; QK^T and AV
            if isinstance(block.ffn, MoE):
                n = block.ffn.router.n_experts
                k = experts_per_token[layer] if experts_per_token else (n if c.routing == "top_any" else c.top_k)
                total += 2 * d * n + k * 2 * 2 * d * c.expert_hidden  # router scores, k experts
                if isinstance(block.ffn.router, KeyRouter):  # learned growth gates: linear term + hidden units
                    total += 2 * d * len(block.ffn.router.gate_b) * (1 + block.ffn.router.gate_u.shape[1])
            else:
                total += 2 * 2 * d * c.dense_hidden
        return total * (self.n_paths if all_paths else 1)

    def moe(self, layer: int) -> MoE:
        if not isinstance(ffn := self.blocks[layer].ffn, MoE):
            raise ValueError(f"layer {layer} has a dense FFN, not a mixture of experts")
        return ffn

    def add_expert(self, layer: int, key: torch.Tensor, init: str = "copy_nearest",
                   gate: int | None = None, path: int = 0) -> int:
        return self.moe(layer).add_expert(key, init, gate, path)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                update_keys: bool = False, path: int | None = None) -> ModelOutput:
        """``path``: a path number runs that path alone (0: the model before any path growth); a
        :data:`PATH_MODES` value mixes every path (:data:`ALL_PATHS`), selects one per segment
        (:data:`SELECTED_PATHS`) or mixes that one with path 0 (:data:`SELECTED_AND_BASE`); None does
        what ``inference`` says."""
        B, T = idx.shape
        if T > self.cfg.seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds seq_len={self.cfg.seq_len}")
        h0 = self.trunk(idx)
        mode = self.path_mode(path)
        passes = 1.0
        if mode == "one":
            path = max(path or 0, 0)
            logits, routing = self.from_trunk(h0, update_keys, path)
            chosen = idx.new_full((B, T), path)
        elif update_keys:
            raise ValueError("update_keys: keys move on one path (a path number), not on a choice or mixture of paths")
        elif mode == "mixture":
            runs = [self.from_trunk(h0, False, p) for p in range(self.n_paths)]
            logits, weights = paths.mix_paths(torch.stack([logits for logits, _ in runs]), idx)
            chosen = weights.argmax(0)
            routing = paths.most_weighted([r for _, r in runs], chosen)
            passes = float(self.n_paths)
        else:
            logits, routing, chosen, passes = selection.select(self, idx, h0, base=mode == "select_base")
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))
        return ModelOutput(logits, loss, routing, chosen, passes)

    def trunk(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """(B, T) tokens -> (B, T, d) the residual stream after layer 0's attention: every path's."""
        return self.blocks[0].attend(self.wte(idx), self.rope_cos, self.rope_sin, cache)

    def from_trunk(self, h0: torch.Tensor, update_keys: bool, path: int | torch.Tensor,
                   caches: list[KVCache] | None = None) -> tuple[torch.Tensor, list[Routing | None]]:
        """Run ``path`` (one for all sequences, or (B,) one per sequence) from the trunk output: layer 0's
        FFN, then every later block (``caches``: their attention caches, one per later block), then the path's
        head (hst.heads). Returns float logits and per-layer routing."""
        x, r = self.blocks[0].feed(h0, update_keys, path)
        routing = [r]
        for i, block in enumerate(self.blocks[1:]):
            x, r = block(x, self.rope_cos, self.rope_sin, update_keys, path, caches[i] if caches else None)
            routing.append(r)
        return self.path_heads.logits(norm(x), path, self.lm_head.weight), routing

    def path_scores(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T) bytes -> (B, T, P) each path's sketch log-likelihood of bytes 0..t (hst.paths)."""
        return paths.sketch_scores(idx, self.path_sketches, self.n_paths)
