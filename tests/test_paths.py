import dataclasses

import pytest
import torch

from hst import data, grow, paths, sketches
from hst.config import GrowConfig, TrainConfig
from hst.generate import Decoder
from hst.model import ALL_PATHS, GPT, SELECTED_AND_BASE, SELECTED_PATHS
from hst.router import Gate

ENGLISH = data.encode(["the quick brown fox jumps over the lazy dog and then the cat sat on the mat " * 8])
NUMBERS = data.encode(["0123 4567 89 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 " * 8])
TCFG = TrainConfig(domains=(), batch_size=4, warmup_steps=1, eval_every=1000, precision="fp32", steps=4)


def model_with_paths(cfg, n_paths: int) -> GPT:
    """``n_paths`` - 1 grown paths (a few training steps each), sketched alternately on English and numbers."""
    model = GPT(cfg)
    grow_cfg = GrowConfig(experts=2, steps=2, gate_windows=4, lr=1e-2)
    for p in range(1, n_paths):
        grow.grow(model, list(range(cfg.n_layer)), (ENGLISH, NUMBERS)[p % 2], {"base": ENGLISH}, grow_cfg, TCFG)
    return model.eval()


def test_a_sequence_costs_a_bounded_number_of_passes_whatever_the_number_of_paths():
    T = 256
    assert paths.segments(T) == [(0, 8), (8, 32), (32, 96), (96, 256)]
    kept = torch.tensor([[0, 3, 3, 3]])  # one choice kept: path 0's first segment is the only extra
    assert paths.relative_cost(kept, T) == pytest.approx(1 + 8 / T)
    worst = torch.tensor([[0, 5, 9, 40]])  # a new path at every decision
    assert paths.relative_cost(worst, T) == pytest.approx(1 + sum(paths.DECISIONS) / T)
    # Path 0 beside the selection: until it is pruned, or to the end of the last segment it serves.
    assert paths.relative_cost(kept, T, pruned_at=torch.tensor([32])) == pytest.approx(1 + 32 / T)
    assert paths.relative_cost(torch.tensor([[0, 3, 0, 3]]), T, pruned_at=torch.tensor([8])) == pytest.approx(1 + 96 / T)
    assert paths.relative_cost(torch.tensor([[0, 0, 0, 0]]), T, pruned_at=torch.tensor([T])) == 1
    runs = paths.runs(torch.tensor([[0, 2, 0, 2], [0, 0, 0, 0]]), T)
    assert {k: v.tolist() for k, v in runs.items()} == {(0, 96): [0], (0, 256): [1], (2, 256): [0]}


def test_selection_gives_each_segment_its_own_paths_logits_and_runs_a_bounded_number_of_paths(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, seq_len=128)
    model = model_with_paths(cfg, 5)
    idx = torch.stack([ENGLISH[:128], NUMBERS[:128], torch.cat([ENGLISH[:40], NUMBERS[:88]])]).long()
    passed = []
    original = model.from_trunk
    model.from_trunk = lambda h0, *a, **k: passed.append(h0.shape[:2]) or original(h0, *a, **k)
    with torch.no_grad():
        model(idx, path=ALL_PATHS)
    mixture, passed = sum(b * t for b, t in passed), []
    with torch.no_grad():
        out = model(idx, path=SELECTED_PATHS)
    model.from_trunk = original
    # Each path a sequence uses runs once, over at most the whole sequence; the mixture runs all five.
    assert mixture == 5 * len(idx) * 128
    assert sum(b * t for b, t in passed) <= len(idx) * 128 * (1 + (8 + 32 + 96) / 128)
    assert out.path[0, 8:].unique().tolist() != out.path[1, 8:].unique().tolist()  # English and numbers differ
    assert out.path[:, :8].eq(0).all()
    for b in range(len(idx)):
        for start, end in paths.segments(128):
            p = int(out.path[b, start])
            with torch.no_grad():
                ref = model(idx[b:b + 1, :end], path=p).logits[0, start:end]
            assert torch.allclose(out.logits[b, start:end], ref, atol=1e-5), (b, start, p)


@pytest.mark.parametrize("prune", [0.0, 0.5])
def test_the_selection_mixed_with_path_0_runs_path_0_beside_it_until_pruned(tiny_cfg, monkeypatch, prune):
    # prune 0.5: path 0 stops at a check wherever the selection explains the context better.
    monkeypatch.setattr(paths, "PRUNE", prune)
    cfg = dataclasses.replace(tiny_cfg, seq_len=128)
    model = model_with_paths(cfg, 5)
    idx = torch.stack([ENGLISH[:128], NUMBERS[:128], torch.cat([ENGLISH[:40], NUMBERS[:88]]), NUMBERS[7:135],
                       torch.cat([NUMBERS[:50], ENGLISH[:78]])]).long()
    with torch.no_grad():
        selected = model(idx, path=SELECTED_PATHS)
        base = model(idx, path=0).logits
        runs = []
        original = model.from_trunk
        model.from_trunk = lambda h0, _, path, *a: runs.append((h0.shape[:2], path)) or original(h0, _, path, *a)
        out = model(idx, path=SELECTED_AND_BASE)
        model.from_trunk = original
    mixed, weights = paths.mix_paths(torch.stack([selected.logits, base]), idx)
    # Path 0 stops at the first check where its posterior weight is below PRUNE (and the selection
    # does not serve it later); from there the selection serves alone.
    logp = torch.stack([selected.logits, base]).log_softmax(-1)
    assert paths.checks(128) == [8, 16, 32, 48, 64, 80, 96, 112]  # the decisions and every 16th byte
    pruned_at = paths.pruned(weights[1])
    first = [next((d for d in paths.checks(128) if weights[1, b, d] < prune), 128) for b in range(5)]
    assert pruned_at.tolist() == first and (pruned_at < 128).any() == (prune > 0)
    alone = torch.arange(128)[None] >= pruned_at[:, None]
    assert torch.allclose(out.logits, torch.where(alone[..., None], logp[0], mixed), atol=1e-5)
    # Path 0 runs piece by piece, for no more sequences than need it; the other runs are the selection's.
    zero = [(shape, p) for shape, p in runs if not torch.is_tensor(p)]
    assert [t for (_, t), _ in zero] == [e - s for s, e, _ in paths.pieces(128)][:len(zero)] and zero[0][0][0] == 5
    assert all((p != 0).all() for _, p in runs if torch.is_tensor(p))
    spent = sum(b * t for (b, t), _ in runs)
    assert out.passes == pytest.approx(spent / (5 * 128)) and out.passes <= 2 + sum(paths.DECISIONS) / 128
    serving = paths.segment_paths(model.path_scores(idx))
    assert out.passes == pytest.approx(paths.relative_cost(serving, 128, pruned_at))
    if prune:
        assert sum(b * t for (b, t), _ in zero) < 5 * 128
    # Each position reports the member weighted most: the selected path, or path 0 (never where stopped).
    assert torch.equal(out.path, torch.where((weights[1] > weights[0]) & ~alone, 0, selected.path))
    with pytest.raises(ValueError, match="inference: expected one of mixture, select, select_base"):
        model.inference = "all"


@pytest.mark.parametrize("mode, prune", [(0, 0), (2, 0), (ALL_PATHS, 0), (SELECTED_PATHS, 0), (SELECTED_AND_BASE, 0),
                                         (SELECTED_AND_BASE, 0.5)])
def test_the_kv_cached_decoder_gives_the_logits_of_the_full_forward(tiny_cfg, monkeypatch, mode, prune):
    monkeypatch.setattr(paths, "PRUNE", prune)
    cfg = dataclasses.replace(tiny_cfg, seq_len=128)
    model = model_with_paths(cfg, 4)
    idx = torch.stack([ENGLISH[:128], NUMBERS[:128], torch.cat([NUMBERS[:50], ENGLISH[:78]])]).long()
    with torch.no_grad():
        full = model(idx, path=mode).logits
        decoder = Decoder(model, mode)
        steps = [decoder.start(idx[:, :5])] + [decoder.step(idx[:, t]) for t in range(5, 128)]
        for t, logits in enumerate(steps):
            assert torch.allclose(logits, full[:, t + 4], atol=1e-4), t
        # Past seq_len the context restarts from its last half, as a forward pass of that window sees it.
        last = decoder.step(idx[:, 100])
        window = torch.cat([idx[:, -63:], idx[:, 100:101]], 1)
        assert torch.allclose(last, model(window, path=mode).logits[:, -1], atol=1e-4)


def test_a_model_with_learned_gates_decodes_by_rerunning_its_context(tiny_cfg):
    # A learned gate opens on the running mean of its scores over the context: no cache can step it.
    model = GPT(tiny_cfg).eval()
    for layer in (0, 1):
        router = model.moe(layer).router
        model.add_expert(layer, torch.randn(tiny_cfg.d_model), "random", router.add_gate(
            Gate.linear(torch.randn(tiny_cfg.d_model), 0.0, 0.0)))
    idx = torch.stack([ENGLISH[:32], NUMBERS[:32]]).long()
    with torch.no_grad():
        full = model(idx).logits
        decoder = Decoder(model)
        steps = [decoder.start(idx[:, :5])] + [decoder.step(idx[:, t]) for t in range(5, 32)]
    assert decoder.mode == "rerun"
    assert all(torch.allclose(logits, full[:, t + 4], atol=1e-5) for t, logits in enumerate(steps[:-1]))


def test_each_path_is_sketched_on_its_own_records_and_the_checkpoint_says_how_to_run_them(tiny_cfg):
    model = GPT(tiny_cfg)
    cfg = GrowConfig(experts=2, steps=0, gate_windows=4, inference="select")
    grow.grow(model, [0, 1], NUMBERS, {"base": ENGLISH}, cfg, TCFG)
    assert torch.equal(model.path_sketches, sketches.stack([sketches.fit_sketch(ENGLISH), sketches.fit_sketch(NUMBERS)]))
    assert model.inference == "select"
    with pytest.raises(ValueError, match="inference: expected"):
        model.inference = "both"
