"""Generating text: a key/value-cached decoder and sampling records from a model.

:class:`Decoder` gives next-byte logits one byte at a time with attention caches, running paths as
``GPT.forward`` does: the trunk (layer 0's attention, shared by every path) has one cache for all
sequences; above it each sequence extends the cache of the path serving it (with the selection, a
sequence that switches path at a decision position has the new path run over its context once), and
of path 0 too when the selection is mixed with it, or, for the mixture, of every path.
When a context reaches ``seq_len`` it restarts from its last ``seq_len // 2`` bytes, as a forward pass
over that window would see them.

A cycle that may not store or read old text (``cycle.replay: generated``) replays what the cycle's
start model itself produces instead (:func:`sample_records`): records sampled from it stand in for
the learned domains' records in the expert index and the coresets. The samples are seeded, so the
same model and seed give the same records.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from hst import paths, selection, sketches
from hst.attention import KVCache
from hst.data import SEPARATOR
from hst.evaluation import eval_mode
from hst.model import ALL_PATHS, GPT


class Decoder:
    """Incremental next-byte logits of ``model`` for a batch of sequences (eval mode, no gradients).

    ``start(prompt)`` takes a (B, L) prompt and returns the logits of its last position; ``step(tokens)``
    appends one byte per sequence and returns the next logits, (B, vocab) each. They equal the logits
    of ``model(context)`` at the context's last position, where context is everything since the last
    restart (tested), for one path, the selection (alone or mixed with path 0) and the mixture alike
    (a mixture runs each of its members per byte, each with its own cache, and returns its
    log-probabilities), run as ``model(context, path=path)`` runs them. A model with learned growth
    gates has no cache: it re-runs its last ``seq_len`` bytes for every byte.
    """

    def __init__(self, model: GPT, path: int | None = None):
        self.model, self.path = model, path
        self.mode = model.path_mode(path)
        # A learned growth gate opens on the running mean of its scores over the whole context, which
        # one cached step cannot see: such a model re-runs its context (at most seq_len bytes) per byte.
        if model.gated:
            self.mode = "rerun"

    @torch.no_grad()
    def start(self, prompt: torch.Tensor) -> torch.Tensor:
        model = self.model
        B = len(prompt)
        self.tokens = prompt
        if self.mode == "rerun":
            return model(prompt[:, -model.cfg.seq_len:], path=self.path).logits[:, -1]
        self.trunk_cache = KVCache()
        self.h0 = model.trunk(prompt, self.trunk_cache)  # (B, t, d): a path starting late needs every position
        self.groups: dict[int, tuple[torch.Tensor, list[KVCache]]] = {}  # path -> (rows, caches above the trunk)
        rows = torch.arange(B, device=prompt.device)
        if self.mode == "mixture":
            return self._mix_start(torch.stack([self._open(p, rows) for p in range(model.n_paths)]), prompt)
        if self.mode == "one":
            self.serving = prompt.new_full((B,), max(self.path or 0, 0))
        else:
            loglik = sketches.byte_logp(prompt, model.path_sketches).cumsum(1)  # (B, t, K) each sketch's, so far
            self.loglik = loglik[:, -1]
            self.serving = paths.segment_paths(paths.by_path(loglik, model.n_paths))[:, -1]
        if self.mode == "select_base":
            return self._start_beside_path_0(prompt)
        logits = self.h0.new_empty(B, model.cfg.vocab_size, dtype=torch.float32)
        for p in self.serving.unique().tolist():
            mine = (self.serving == p).nonzero()[:, 0]
            logits[mine] = self._open(p, mine)[:, -1]
        return logits

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B,) the next byte of every sequence -> (B, vocab) logits after it."""
        model = self.model
        if self.mode == "rerun":
            self.tokens = torch.cat([self.tokens, tokens[:, None]], 1)[:, -model.cfg.seq_len:]
            return model(self.tokens, path=self.path).logits[:, -1]
        if self.tokens.shape[1] >= model.cfg.seq_len:
            return self.start(torch.cat([self.tokens, tokens[:, None]], 1)[:, -(model.cfg.seq_len // 2):])
        position = self.tokens.shape[1]
        self.tokens = torch.cat([self.tokens, tokens[:, None]], 1)
        h = model.trunk(tokens[:, None], self.trunk_cache)  # (B, 1, d)
        self.h0 = torch.cat([self.h0, h], 1)
        if self.mode == "mixture":
            return self._mix_step(tokens, torch.stack([model.from_trunk(h, False, p, caches)[0][:, -1]
                                                       for p, (_, caches) in self.groups.items()]))
        serving = self.serving
        if self.mode != "one":
            recent = self.tokens[:, -(sketches.SKETCH_ORDER + 1):]  # the new byte and its context
            self.loglik = self.loglik + sketches.byte_logp(recent, model.path_sketches)[:, -1]
            if position in paths.DECISIONS:
                serving = paths.by_path(self.loglik, model.n_paths).argmax(-1)
        beside = self.mode == "select_base"
        if beside:  # the members' log-likelihood of bytes 1..position; path 0 may stop here
            self.seen = self.seen + self.last.gather(-1, tokens[None, :, None].expand(2, -1, 1))[..., 0]
            if position in paths.checks(position + 1):
                self._prune()
            base = h.new_zeros(len(tokens), model.cfg.vocab_size, dtype=torch.float32)
            if len(self.base_rows):
                base[self.base_rows] = model.from_trunk(h[self.base_rows], False, 0, self.base)[0][:, -1]
        # Which sequences the selection runs in a group of their own path (with path 0 beside them,
        # those whose selected path is path 0 read its logits, until it is pruned).
        need = (serving != 0) | ~self.alive if beside else torch.ones_like(serving, dtype=torch.bool)
        logits = h.new_empty(len(tokens), model.cfg.vocab_size, dtype=torch.float32)
        grouped = torch.zeros_like(need)
        for p, (rows, caches) in list(self.groups.items()):
            keep = (serving[rows] == p) & need[rows]
            if not keep.all():
                self.groups[p] = (rows[keep], [c.rows(keep) for c in caches])
            if keep.any():
                rows, caches = self.groups[p]
                logits[rows] = model.from_trunk(h[rows], False, p, caches)[0][:, -1]
                grouped[rows] = True
            else:
                del self.groups[p]
        for p in serving[need & ~grouped].unique().tolist():  # a new path: run over the whole context once
            mine = (need & ~grouped & (serving == p)).nonzero()[:, 0]
            logits[mine] = self._open(p, mine)[:, -1]
        self.serving = serving
        if not beside:
            return logits
        logits[~need] = base[~need]
        return self._beside_path_0(logits, base)

    def _start_beside_path_0(self, prompt: torch.Tensor) -> torch.Tensor:
        """``start`` for the selection mixed with path 0 (``GPT.forward`` with ``select_base``): path 0
        over the prompt with its cache, the selection's logits over it, and where path 0 was pruned."""
        model = self.model
        self.base = [KVCache() for _ in range(model.cfg.n_layer - 1)]
        base = model.from_trunk(self.h0, False, 0, self.base)[0]
        selected = selection.select(model, prompt, self.h0)[0]  # (B, t, V) the selection over the prompt
        logp = torch.stack([selected, base]).log_softmax(-1)  # (2, B, t, V)
        seen = logp[:, :, :-1].gather(-1, prompt[None, :, 1:, None].expand(2, -1, -1, 1))[..., 0]
        past = torch.cat([seen.new_zeros(2, len(prompt), 1), seen.cumsum(-1)], -1)  # (2, B, t): bytes 1..i
        self.alive = torch.ones(len(prompt), dtype=torch.bool, device=prompt.device)
        self.base_rows = torch.arange(len(prompt), device=prompt.device)
        for d in paths.checks(prompt.shape[1]):
            self.seen = past[:, :, d]
            self._prune()
        self.seen, self.last = past[:, :, -1], logp[:, :, -1]
        need = (self.serving != 0) | ~self.alive
        for p in self.serving[need].unique().tolist():
            self._open(p, (need & (self.serving == p)).nonzero()[:, 0])
        return torch.where(self.alive[:, None], self._mixed(), self.last[0])

    def _prune(self) -> None:
        """At a check position (:func:`hst.paths.checks`): path 0 stops for the sequences where its
        posterior weight beside the selection fell below :data:`hst.paths.PRUNE` (as ``GPT.select_paths``
        decides)."""
        self.alive = self.alive & ((self.seen[1] - self.seen[0]).sigmoid() >= paths.PRUNE)
        keep = self.alive[self.base_rows]
        if not keep.all():
            self.base_rows = self.base_rows[keep]
            self.base = [c.rows(keep) for c in self.base]

    def _beside_path_0(self, selected: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """(B, V) the selection's and path 0's logits -> their posterior mixture, or the selection alone where pruned."""
        self.last = torch.stack([selected, base]).log_softmax(-1)
        return torch.where(self.alive[:, None], self._mixed(), self.last[0])

    def _mix_start(self, out: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        """(M, B, t, V) the logits of a mixture's M members over the prompt -> the mixture's last log-probabilities."""
        self.seen = out[:, :, :-1].log_softmax(-1).gather(-1, prompt[None, :, 1:, None].expand(
            len(out), len(prompt), -1, 1))[..., 0].sum(-1)  # (M, B) each member's log-likelihood of the context
        self.last = out[:, :, -1].log_softmax(-1)  # (M, B, V)
        return self._mixed()

    def _mix_step(self, tokens: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """(B,) the byte just appended, (M, B, V) the members' logits after it -> the mixture's log-probabilities."""
        self.seen = self.seen + self.last.gather(-1, tokens[None, :, None].expand(len(self.last), -1, 1))[..., 0]
        self.last = out.log_softmax(-1)
        return self._mixed()

    def _mixed(self) -> torch.Tensor:
        """(B, V) the members' next-byte log-probabilities (``last``) mixed by their posterior given the context (``seen``)."""
        return (self.seen.log_softmax(0)[..., None] + self.last).logsumexp(0)

    def _open(self, path: int, rows: torch.Tensor) -> torch.Tensor:
        """Run ``path`` over the whole context of ``rows``, which join its group; their (n, t, V) logits."""
        caches = [KVCache() for _ in range(self.model.cfg.n_layer - 1)]
        out, _ = self.model.from_trunk(self.h0[rows], False, path, caches)
        if path in self.groups:
            old_rows, old = self.groups[path]
            rows = torch.cat([old_rows, rows])
            caches = [KVCache.join([a, c]) for a, c in zip(old, caches)]
        self.groups[path] = (rows, caches)
        return out


@torch.no_grad()
def sample_records(model: GPT, n: int, n_bytes: int, seed: int, temperature: float = 1.0,
                   batch_size: int = 32) -> list[str]:
    """``n`` records of ``n_bytes`` bytes each, sampled from ``model`` after a record separator.
    Bytes that do not form valid UTF-8 are dropped when a record is decoded."""
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
            decoder = Decoder(model)
            logits = decoder.start(start.repeat(b, 1).to(device))
            drawn = []
            for _ in range(n_bytes):
                drawn.append(draw(logits, temperature, gen))
                logits = decoder.step(drawn[-1].to(device))
            out += [bytes(row.tolist()).decode("utf-8", errors="ignore") for row in torch.stack(drawn, 1)]
    return out


def draw(logits: torch.Tensor, temperature: float, gen: torch.Generator) -> torch.Tensor:
    """(B, vocab) logits -> (B,) bytes sampled at ``temperature`` (0: the most likely byte)."""
    if temperature == 0:
        return logits.float().cpu().argmax(-1)
    return torch.multinomial(torch.softmax(logits.float().cpu() / temperature, dim=-1), 1, generator=gen)[:, 0]


@torch.no_grad()
def continue_text(model: GPT, prompt: bytes, n_bytes: int, temperature: float, seed: int) -> tuple[bytes, int]:
    """``n_bytes`` bytes continuing ``prompt`` (its last ``seq_len`` bytes are the context) and the path
    serving the last of them (``ALL_PATHS`` for the mixture)."""
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with eval_mode(model):
        decoder = Decoder(model)
        logits = decoder.start(torch.tensor([list(prompt[-model.cfg.seq_len:])], dtype=torch.long, device=device))
        drawn = []
        for i in range(n_bytes):
            drawn.append(draw(logits, temperature, gen))
            if i + 1 < n_bytes:
                logits = decoder.step(drawn[-1].to(device))
    serving = getattr(decoder, "serving", None)
    path = ALL_PATHS if decoder.mode == "mixture" else int(serving[0]) if serving is not None else 0
    return bytes(torch.cat(drawn).tolist()), path
