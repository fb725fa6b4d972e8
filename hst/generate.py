"""Sampling text from a model: the synthetic replay of replay-free cycles.

A cycle that may not store or read old text (``cycle.replay: generated``) replays what the cycle's
start model itself produces instead: records sampled from it stand in for the learned domains'
records in the expert index, the coresets and the growth gates' held-in reference. The samples are
seeded, so the same model and seed give the same records.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from hst.data import SEPARATOR
from hst.model import GPT
from hst.train import eval_mode


@torch.no_grad()
def sample_records(model: GPT, n: int, n_bytes: int, seed: int, temperature: float = 1.0,
                   batch_size: int = 32) -> list[str]:
    """``n`` records of ``n_bytes`` bytes each, sampled from ``model`` after a record separator.

    Every step re-runs the whole prefix (at most ``seq_len`` bytes): the model has no KV cache,
    and re-running keeps the growth gates' causal running means exact. Bytes that do not form
    valid UTF-8 are dropped when a record is decoded.
    """
    if n < 1 or n_bytes < 1 or temperature <= 0:
        raise ValueError(f"sample_records: expected n >= 1, n_bytes >= 1, temperature > 0; "
                         f"got {n}, {n_bytes}, {temperature}")
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    start = torch.tensor(list(SEPARATOR.encode("utf-8")), dtype=torch.long)
    out = []
    with eval_mode(model):
        for first in tqdm(range(0, n, batch_size), desc="sample replay", unit="batch"):
            b = min(batch_size, n - first)
            seq = start.repeat(b, 1)  # (b, len(SEPARATOR)) then grows by one byte per step
            for _ in range(n_bytes):
                logits = model(seq[:, -model.cfg.seq_len:].to(device)).logits[:, -1].float().cpu()
                probs = torch.softmax(logits / temperature, dim=-1)
                seq = torch.cat([seq, torch.multinomial(probs, 1, generator=gen)], dim=1)
            out += [bytes(row[len(start):].tolist()).decode("utf-8", errors="ignore") for row in seq]
    return out
