"""Self-describing checkpoints: weights, keys, expert counts per layer and the model config.

A checkpoint is a plain dict of tensors and primitives, loadable with
``torch.load(weights_only=True)``, so a model can be rebuilt from the file alone. Writes are
atomic (temporary file + rename).
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import torch

from hst.config import ConfigError, HSTError, ModelConfig
from hst.io import atomic_path
from hst.model import GPT
from hst.sketches import count as count_sketches
from hst.router import Gate, KeyRouter

FORMAT_VERSION = 7  # 2: key routers carry growth gates (gate_w, gate_b); 3: gates shared, optionally MLP;
#                    4: a gate may belong to a path (gate_path), and a model with paths stores one sketch per path
#                    and its inference mode (path_sketches, path_select); 5: each expert names its path
#                    (expert_path) and every gate is a learned one; 6: path sketches are n-gram counts, path 0
#                    one per domain; 7: a grown path may have an output head of its own (path_heads.<path>, hst/heads.py).
#                    Formats 2 to 6 load (2 to 5 converted); one with trigram-table sketches does not.


class CheckpointError(HSTError):
    """A checkpoint is missing, unreadable, or does not match what the caller expects."""


def save(path: str | Path, model: GPT, meta: dict | None = None) -> None:
    """Write ``model`` and ``meta`` to ``path``; a model with a NaN/inf weight is refused, never written."""
    bad = _non_finite(model.state_dict())
    if bad:
        raise CheckpointError(f"{path}: refusing to write non-finite weights ({bad}); training diverged")
    state = {
        "format_version": FORMAT_VERSION,
        "config": dataclasses.asdict(model.cfg),
        "n_experts": model.n_experts,
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "meta": dict(meta or {}),
    }
    with atomic_path(path) as tmp:
        try:
            torch.save(state, tmp)
        except RuntimeError as e:  # torch reports a full disk as "file write failed", never ENOSPC
            free = shutil.disk_usage(tmp.parent).free
            raise CheckpointError(f"{path}: could not write the checkpoint ({_reason(e)}); {free / 2**20:.0f} MiB "
                                  "free on its disk: is it full?") from None


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
        reason = _reason(e)
        if "GLOBAL" in reason:  # a pickled callable: what a malicious file carries
            raise CheckpointError(f"{path}: refused: holds objects other than tensors and plain values "
                                  f"(loading it could run code: {reason})") from None
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {reason})") from None
    if not isinstance(state, dict) or state.get("format_version") not in range(2, FORMAT_VERSION + 1):
        raise CheckpointError(f"{path}: not an HST checkpoint of format {FORMAT_VERSION} (or 2 to 6)")
    missing = [k for k in ("config", "n_experts", "state_dict", "meta") if k not in state]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {missing}")
    try:
        cfg = ModelConfig(**state["config"])
    except (TypeError, ConfigError) as e:
        raise CheckpointError(f"{path}: stored config is invalid ({e})") from None
    if expect is not None and expect != cfg:
        diff = {f.name: (getattr(cfg, f.name), getattr(expect, f.name))
                for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(expect, f.name)}
        raise CheckpointError(f"{path}: model config does not match params.yaml:model (stored, expected): {diff}")
    counts = state["n_experts"]
    least = 1 if cfg.ffn == "dense" else cfg.top_k  # a dense FFN is stored as one expert per layer
    if not (isinstance(counts, list) and len(counts) == cfg.n_layer
            and all(isinstance(n, int) and n >= least for n in counts)):
        raise CheckpointError(f"{path}: expert counts {counts!r} do not fit the stored config "
                              f"(expected {cfg.n_layer} counts >= {least})")
    if not isinstance(state["meta"], dict):
        raise CheckpointError(f"{path}: meta is not a mapping")
    bad = _non_finite(state["state_dict"])
    if bad:
        raise CheckpointError(f"{path}: non-finite weights ({bad}); a diverged model is never used")
    model = GPT(cfg, counts)
    version, state_dict = state["format_version"], state["state_dict"]
    # Loading casts into the model's integer buffers, so a float path or gate number is caught here, in the file.
    for key, value in state_dict.items() if isinstance(state_dict, dict) else ():
        if key.endswith(("expert_gate", "expert_path", "gate_path")) and isinstance(value, torch.Tensor) \
                and value.is_floating_point():
            raise CheckpointError(f"{path}: {key} must hold integers, got {value.dtype}")
    if version < 6 and isinstance(state_dict, dict) and ("path_sketches" in state_dict or any(
            k.endswith("gate_path") and isinstance(v, torch.Tensor) and bool((v >= 1).any())
            for k, v in state_dict.items())):
        raise CheckpointError(f"{path}: its paths' sketches are format {version}'s byte-trigram tables (or missing), "
                              f"which format {FORMAT_VERSION} replaced: re-run the cycles that grew its paths")
    try:
        if version < 5:
            state_dict = _from_format_4(state_dict if version >= 3 else _from_format_2(state_dict))
        model.load_state_dict(state_dict)
    except (RuntimeError, TypeError, AttributeError, IndexError, KeyError) as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"{path}: weights do not match the stored config ({first})") from None
    _check_gates(path, model)
    heads = sorted(int(p) for p in model.path_heads)
    shape = model.lm_head.weight.shape
    if heads and (heads[0] < 1 or heads[-1] >= model.n_paths or any(w.shape != shape for w in model.path_heads.values())):
        raise CheckpointError(f"{path}: output heads of paths {heads} do not fit {model.n_paths} paths of "
                              f"{tuple(shape)} heads")
    paths, sketches = model.n_paths, count_sketches(model.path_sketches)
    if (sketches and sketches < paths) or (paths > 1 and not sketches):
        raise CheckpointError(f"{path}: {paths} paths but {sketches} path sketches (expected one or more for path 0 "
                              "and one per later path; a file written before path sketches existed must re-run the "
                              "cycles that grew its paths)")
    return model, state["meta"]


def _check_gates(path: Path, model: GPT) -> None:
    """Every key router's growth gates and paths must fit together: a gate and a path number per
    expert; a gate -1 (none) or an existing one, as many rows in every gate field; a path >= 0, the
    paths numbered 1..P-1 without a gap. A file edited by hand fails here, in one line, instead of
    routing tokens through experts that do not exist."""
    seen_paths: set[int] = set()
    for layer, block in enumerate(model.blocks):
        router = getattr(block.ffn, "router", None)
        if not isinstance(router, KeyRouter):
            continue
        where = f"{path}: layer {layer}"
        G = len(router.gate_b)
        if len(router.expert_gate) != router.n_experts or not (
                (router.expert_gate >= -1) & (router.expert_gate < G)).all():
            raise CheckpointError(f"{where}: expert_gate must give each of {router.n_experts} experts -1 or a gate "
                                  f"0..{G - 1}")
        if any(len(getattr(router, f"gate_{f}")) != G for f in Gate._fields):
            raise CheckpointError(f"{where}: growth gate fields disagree on the number of gates ({G} biases)")
        if len(router.expert_path) != router.n_experts or (router.expert_path < 0).any():
            raise CheckpointError(f"{where}: expert_path must give each of {router.n_experts} experts a path >= 0")
        seen_paths |= set(router.expert_path[router.expert_path > 0].tolist())
    if seen_paths and seen_paths != set(range(1, max(seen_paths) + 1)):
        raise CheckpointError(f"{path}: paths {sorted(seen_paths)} are not numbered 1..{max(seen_paths)}")


def _from_format_4(state_dict: dict) -> dict:
    """Formats 3 and 4 had no path per expert: every gate they hold is a learned one (a format-4 file
    with paths is refused before this, for its sketches), so every expert is on path 0."""
    out = {k: v for k, v in state_dict.items() if not k.endswith("router.gate_path")}
    for key in [k for k in state_dict if k.endswith("router.expert_gate")]:
        out[key[:-len("expert_gate")] + "expert_path"] = torch.zeros_like(state_dict[key])
    return out


def _from_format_2(state_dict: dict) -> dict:
    """Format 2 stored one linear gate per expert (``gate_w`` (E, d), ``gate_shift``, ``gate_b``;
    ungated: 0, 0, 1): one gate per distinct gated row, which is exactly how it routed."""
    out = dict(state_dict)
    for key in [k for k in state_dict if k.endswith("router.gate_w")]:
        prefix = key[:-len("gate_w")]
        w, shift, b = (out.pop(prefix + name) for name in ("gate_w", "gate_shift", "gate_b"))
        gates: dict[tuple, int] = {}  # distinct gated row -> its gate index
        expert_gate, first = [], []  # per expert its gate (-1: ungated); per gate its first expert
        for e in range(len(w)):
            row = (tuple(w[e].tolist()), float(shift[e]), float(b[e]))
            if row == ((0.0,) * w.shape[1], 0.0, 1.0):
                expert_gate.append(-1)
                continue
            if row not in gates:
                gates[row] = len(first)
                first.append(e)
            expert_gate.append(gates[row])
        first = torch.tensor(first, dtype=torch.long)
        n, d = len(first), w.shape[1]
        out |= {prefix + "expert_gate": torch.tensor(expert_gate, dtype=torch.long),
                prefix + "gate_w": w[first], prefix + "gate_u": w.new_zeros(n, 0, d),
                prefix + "gate_c": w.new_zeros(n, 0), prefix + "gate_v": w.new_zeros(n, 0),
                prefix + "gate_shift": shift[first], prefix + "gate_b": b[first]}
    return out


def _reason(e: Exception) -> str:
    """The line of torch's load error that says what is wrong (not its advice about weights_only)."""
    advice = ("Weights only load failed", "Please file an issue", "Check the documentation", "WeightsUnpickler error")
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.strip().startswith(advice)]
    return (lines or [str(e).strip()])[0][:300]


def _non_finite(state_dict: dict) -> str:
    """Names of floating tensors holding NaN or inf (first three), '' if none."""
    if not isinstance(state_dict, dict):
        return ""
    bad = [k for k, v in state_dict.items()
           if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all()]
    return ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
