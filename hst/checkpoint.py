"""Self-describing checkpoints: weights, keys, expert counts per layer and the model config.

A checkpoint is a plain dict of tensors and primitives, loadable with
``torch.load(weights_only=True)``, so a model can be rebuilt from the file alone. Writes are
atomic (temporary file + rename).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from hst.config import ConfigError, HSTError, ModelConfig
from hst.io import atomic_path
from hst.model import GPT

FORMAT_VERSION = 2  # 2: key routers carry growth gates (gate_w, gate_b)


class CheckpointError(HSTError):
    """A checkpoint is missing, unreadable, or does not match what the caller expects."""


def save(path: str | Path, model: GPT, meta: dict | None = None) -> None:
    state = {
        "format_version": FORMAT_VERSION,
        "config": dataclasses.asdict(model.cfg),
        "n_experts": model.n_experts,
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "meta": dict(meta or {}),
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load(path: str | Path, expect: ModelConfig | None = None) -> tuple[GPT, dict]:
    """Rebuild the model stored at ``path``; return ``(model, meta)``.

    With ``expect``, the stored config must equal it (a clear error names the differing fields).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt files
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: not an HST checkpoint of format {FORMAT_VERSION}")
    try:
        cfg = ModelConfig(**state["config"])
    except (TypeError, ConfigError) as e:
        raise CheckpointError(f"{path}: stored config is invalid ({e})") from None
    if expect is not None and expect != cfg:
        diff = {f.name: (getattr(cfg, f.name), getattr(expect, f.name))
                for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(expect, f.name)}
        raise CheckpointError(f"{path}: model config does not match (stored, expected): {diff}")
    model = GPT(cfg, state["n_experts"])
    try:
        model.load_state_dict(state["state_dict"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"{path}: weights do not match the stored config ({first})") from None
    return model, state["meta"]
