import copy
import dataclasses

import pytest
import torch

from hst import data, grow
from hst.config import ConfigError, GrowConfig, TrainConfig
from hst.consolidate import ffn_inputs, only_trainable
from hst.evaluation import routing_stability
from hst.model import GPT
from hst.router import Gate, gate_scores
from hst.train import evaluate, train
from test_paths import corpus_records

NOVEL = torch.tensor(list("Über allen Gipfeln ist Ruh, in allen Wipfeln spürest du kaum einen Hauch; ".encode() * 30),
                      dtype=torch.uint8)
HELD_IN_TEXT = {"python": "def f(x):\n    return x + 1\n" * 20, "shakespeare": "To be, or not to be, that is the question. " * 20}
HELD_IN = {d: data.encode([t]) for d, t in HELD_IN_TEXT.items()}  # per source, as the gates are calibrated
HELD_IN_ALL = data.encode(list(HELD_IN_TEXT.values()))
TCFG = TrainConfig(batch_size=4, warmup_steps=1, eval_every=5, eval_windows=2, precision="fp32")


def assert_only_appended(before: dict, after: dict) -> None:
    """Every tensor of ``before`` is in ``after`` bit for bit: routers' keys and gates appended to, the rest equal."""
    for k, v in before.items():
        grown = k.split(".")[-1] in ("keys", "expert_gate") or k.split(".")[-1].startswith("gate_")
        assert v.numel() == 0 or torch.equal(after[k][:len(v)] if grown else after[k], v), k  # numel 0: no gate yet


def test_growth_adds_gated_experts_and_trains_only_them(tiny_cfg):
    model = GPT(tiny_cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    added, curves, stats = grow.grow(model, [0, 1], NOVEL, HELD_IN, GrowConfig(select="gate", experts=1, steps=5, gate_windows=8), TCFG)
    assert added == [(0, 4), (1, 4)] and model.n_experts == [5, 5]
    assert [s["expert"] for s in stats] == [4, 4]
    after = model.state_dict()
    assert_only_appended(before, after)
    assert not torch.equal(after["blocks.0.ffn.experts.4.up.weight"], before["blocks.0.ffn.experts.0.up.weight"])
    assert after["blocks.0.ffn.router.expert_gate"].tolist() == [-1, -1, -1, -1, 0]  # the new expert has a gate
    assert after["blocks.0.ffn.router.gate_v"][0].abs().sum() > 0  # an MLP one (GrowConfig.gate_hidden)
    assert len(curves["train"]) == 5


def test_random_init_draws_from_the_training_seed_not_the_global_generator(tiny_cfg):
    start = GPT(tiny_cfg).state_dict()

    def new_expert(global_seed: int, seed: int) -> torch.Tensor:
        model = GPT(tiny_cfg)
        model.load_state_dict(start)
        torch.manual_seed(global_seed)
        grow.grow(model, [0], NOVEL, HELD_IN, GrowConfig(select="gate", experts=1, steps=0, gate_windows=8, init="random"),
                  dataclasses.replace(TCFG, seed=seed))
        return model.moe(0).experts[-1].up.weight

    assert torch.equal(new_expert(global_seed=1, seed=0), new_expert(global_seed=2, seed=0))
    assert not torch.equal(new_expert(global_seed=1, seed=0), new_expert(global_seed=1, seed=1))


def test_gates_keep_held_in_routing_and_admit_novel_tokens(tiny_cfg):
    model = GPT(tiny_cfg)
    old = evaluate(model, HELD_IN_ALL, 8).expert_ids
    _, _, stats = grow.grow(model, [0, 1], NOVEL, HELD_IN, GrowConfig(select="gate", experts=1, steps=0, gate_windows=8, gate_fpr=0.02), TCFG)
    assert all(s["held_in_tokens_passing"] <= 0.05 and s["novel_tokens_passing"] > 0.5 for s in stats)
    # Held-in tokens whose gates stay closed keep their routing (untrained new experts change nothing else).
    assert min(routing_stability(old, evaluate(model, HELD_IN_ALL, 8).expert_ids)) >= 0.95
    new_ids = evaluate(model, NOVEL, 8).expert_ids
    assert all((ids == 4).any(-1).float().mean() > 0.3 for ids in new_ids)


def test_new_key_is_the_mean_of_the_novel_tokens_passing_the_gate(tiny_cfg):
    model = GPT(tiny_cfg)
    router = model.moe(1).router
    feats = router.features(ffn_inputs(model, NOVEL, [1], 8)[0])
    grow.grow(model, [1], NOVEL, HELD_IN, GrowConfig(select="gate", experts=1, steps=0, gate_windows=8), TCFG)
    passing = router.eligible(feats)[..., -1]
    want = torch.nn.functional.normalize(feats[passing].mean(0), dim=-1)
    assert torch.allclose(router.keys[-1], want, atol=1e-5)


def test_a_closed_gate_is_honoured_in_the_forward_pass_even_after_training(tiny_cfg):
    model = GPT(tiny_cfg)
    x = HELD_IN_ALL[:2 * tiny_cfg.seq_len].long().view(2, -1)
    with torch.no_grad():
        before = model(x).logits
    for layer in range(tiny_cfg.n_layer):  # a gate that never opens: b = -1
        gate = model.moe(layer).router.add_gate(Gate.linear(torch.zeros(tiny_cfg.d_model), 0.0, -1.0))
        model.add_expert(layer, torch.randn(tiny_cfg.d_model), "random", gate)
    with only_trainable(model, [(l, 4) for l in range(tiny_cfg.n_layer)]):
        train(model, dataclasses.replace(TCFG, steps=3, domains=("novel",), update_keys=False), {"novel": NOVEL}, {})
    with torch.no_grad():
        assert torch.equal(model(x).logits, before)


def test_several_experts_per_layer_share_one_gate_split_the_novel_tokens_and_alone_train(tiny_cfg):
    model = GPT(tiny_cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    added, _, stats = grow.grow(model, [0, 1], NOVEL, HELD_IN, GrowConfig(select="gate", experts=3, steps=4, gate_windows=8), TCFG)
    assert added == [(0, 4), (0, 5), (0, 6), (1, 4), (1, 5), (1, 6)] and model.n_experts == [7, 7]
    assert [s["experts"] for s in stats] == [[4, 5, 6], [4, 5, 6]]
    router = model.moe(1).router
    assert router.expert_gate[4:].tolist() == [0, 0, 0] and len(router.gate_b) == 1
    keys = router.keys[4:]
    assert (keys @ keys.T - torch.eye(3)).abs().max() < 0.9999  # distinct centroids
    assert_only_appended(before, model.state_dict())
    # The shared gate keeps most held-in tokens away from all three new experts.
    closed = ~torch.stack([model.moe(layer).router.eligible(model.moe(layer).router.features(
        ffn_inputs(model, HELD_IN_ALL, [layer], 2)[0][:, :tiny_cfg.seq_len]))[..., 4:].any(-1) for layer in (0, 1)]).any(0)
    assert closed.float().mean() > 0.8


def test_spherical_kmeans_is_the_normalized_mean_for_one_cluster_and_separates_two():
    x = torch.nn.functional.normalize(torch.randn(50, 8), dim=-1)
    assert torch.equal(grow.spherical_kmeans(x, 1)[0], torch.nn.functional.normalize(x.mean(0), dim=-1))
    a, b = torch.zeros(8), torch.zeros(8)
    a[0], b[1] = 1, 1
    pts = torch.nn.functional.normalize(torch.cat([a + 0.05 * torch.randn(20, 8), b + 0.05 * torch.randn(20, 8)]), dim=-1)
    c = grow.spherical_kmeans(pts, 2)
    assert sorted(int(v.abs().argmax()) for v in c) == [0, 1]


def test_each_source_gets_at_most_the_false_positive_rate(tiny_cfg):
    model = GPT(tiny_cfg)
    _, _, stats = grow.grow(model, [0, 1], NOVEL, HELD_IN, GrowConfig(select="gate", steps=0, gate_windows=8, gate_fpr=0.05), TCFG)
    for s in stats:
        assert set(s["held_in_tokens_passing_per_source"]) == {"python", "shakespeare"}
        assert max(s["held_in_tokens_passing_per_source"].values()) <= 0.05 + 1 / 256  # one token of 8 windows × 32


SECOND = torch.tensor(list("SELECT name, count(*) FROM users GROUP BY name ORDER BY 2 DESC; ".encode() * 30),
                      dtype=torch.uint8)


def test_replay_trains_the_experts_grown_earlier_and_nothing_shared(tiny_cfg):
    """With old records, a second growth also trains the first growth's experts, on the old records
    only (where their gate opens), after the new experts and at the training config's rate, not the
    growth rate: the new experts are the same whatever the old records are. The experts present from
    the start and all shared weights stay."""
    first, new = {}, {}
    for name, replay in (("none", None), ("novel", NOVEL), ("second", SECOND)):
        model = GPT(tiny_cfg)
        torch.manual_seed(0)
        grow.grow(model, [0], NOVEL, HELD_IN, GrowConfig(select="gate", experts=1, steps=2, gate_windows=8), TCFG)
        before, start = {k: v.clone() for k, v in model.state_dict().items()}, copy.deepcopy(model)
        held_in = {**HELD_IN, "german": NOVEL}
        added, curves, _ = grow.grow(model, [0], SECOND, held_in,
                                     GrowConfig(select="gate", experts=1, steps=4, gate_windows=8, old_share=0.5), TCFG, replay)
        for src, tokens in held_in.items():  # the budget check saw what the earlier experts' training did too
            change = evaluate(model, tokens, 8).bpb / evaluate(start, tokens, 8).bpb - 1
            assert abs(curves["held_in_bpb_change"][src] - change) < 1e-6, src
        assert added == [(0, 5)]
        assert [row["step"] for row in curves["train"]] == [1, 2, 3, 4]  # one curve over both phases
        if replay is not None:  # each phase's peak rate
            assert [max(row["lr"] for row in curves["train"][p]) for p in (slice(2), slice(2, 4))] == [GrowConfig().lr, TCFG.lr]
        assert_only_appended({k: v for k, v in before.items() if ".experts.4." not in k}, model.state_dict())
        first[name] = torch.equal(model.moe(0).experts[4].up.weight, before["blocks.0.ffn.experts.4.up.weight"])
        new[name] = model.moe(0).experts[5].up.weight.clone()
    assert first == {"none": True, "novel": False, "second": False}  # unchanged without replay, trained with it
    assert torch.equal(new["novel"], new["second"]) and not torch.equal(new["none"], new["novel"])  # 2 steps, not 4


def test_gates_tighten_until_the_held_in_forgetting_fits_the_budget(tiny_cfg, monkeypatch):
    """Within the budget the gates keep their rate; when every window a new gate opens in looks twice
    as bad as it was, the rate halves the full 4 times (here some python window opens at every rate),
    each rate measured on only the windows it opens, one source per rejected rate. Each layer's
    reported pass rates are those of its final bias."""
    results, measure, runs = {}, grow.evaluate, []
    for tight in (False, True):
        if tight:
            def doubled(*args, layers=(), only=None):
                out = measure(*args, layers=layers, only=only)
                if only is None:  # the start model's passes
                    return out
                runs.append(int(only.sum()))
                return out._replace(window_bpb=out.window_bpb * 2)
            monkeypatch.setattr(grow, "evaluate", doubled)
        model = GPT(tiny_cfg)
        start = copy.deepcopy(model)  # the gates are fitted on the start model's features
        _, curves, stats = grow.grow(model, [0, 1], NOVEL, HELD_IN,
                                     GrowConfig(select="gate", experts=1, steps=5, gate_windows=8, gate_fpr=0.2, forgetting_budget=0.01), TCFG)
        results[tight] = stats
        assert set(curves["held_in_bpb_change"]) == {"python", "shakespeare"}
        assert (max(curves["held_in_bpb_change"].values()) > 0.01) == tight
        for s in stats:
            router = model.moe(s["layer"]).router
            f = router.features(ffn_inputs(start, HELD_IN["python"], [s["layer"]], 8)[0])
            assert abs(float(router.eligible(f)[..., -1].float().mean()) - s["held_in_tokens_passing_per_source"]["python"]) < 1e-6
    assert len(runs) >= 5 and all(0 < n < 8 for n in runs[:4])  # one source per rejected rate, part of its windows
    assert all(s["gate_fpr"] == 0.2 for s in results[False])
    assert all(s["gate_fpr"] == 0.2 / 16 for s in results[True])
    assert all(t["held_in_tokens_passing"] <= l["held_in_tokens_passing"] for t, l in zip(results[True], results[False]))
    assert any(t["novel_tokens_passing"] < l["novel_tokens_passing"] for t, l in zip(results[True], results[False]))


def test_tightening_measures_what_evaluating_every_window_measures(tiny_cfg):
    """Windows no new gate opens in are not re-run: the grown model computes on them what the start
    model did (to float rounding), so the reported BPB change is that of a full evaluation."""
    model = GPT(tiny_cfg)
    start = copy.deepcopy(model)
    _, curves, stats = grow.grow(model, [0, 1], NOVEL, HELD_IN,
                                 GrowConfig(select="gate", experts=1, steps=5, gate_windows=8, gate_fpr=0.2, forgetting_budget=0.5), TCFG)
    moved = 0
    for src, tokens in HELD_IN.items():
        full, before = evaluate(model, tokens, 8), evaluate(start, tokens, 8)
        assert abs(curves["held_in_bpb_change"][src] - (full.bpb / before.bpb - 1)) < 1e-6
        routers = [model.moe(layer).router for layer in (0, 1)]  # one gate each, the last
        scores = [(layer, len(r.gate_b) - 1, gate_scores(r.features(x), Gate(*(t[-1] for t in r.gates))))
                  for layer, r, x in zip((0, 1), routers, ffn_inputs(start, tokens, [0, 1], 8))]
        opened = grow.opened_windows(model, scores)
        assert torch.allclose(full.window_bpb[~opened], before.window_bpb[~opened], rtol=0, atol=1e-6)
        moved += int((full.window_bpb[opened] - before.window_bpb[opened]).abs().gt(1e-4).sum())
    assert moved > 0  # the windows a gate opens in did change


class NoText(dict):
    """Held-in text a path must never read: any access fails the test."""

    def __getitem__(self, key):
        raise AssertionError(f"held-in text read: {key}")

    def __iter__(self):
        raise AssertionError("held-in text read")

    def __len__(self):
        raise AssertionError("held-in text read")


def test_a_path_reads_no_held_in_text_trains_only_its_experts_and_leaves_every_earlier_path(tiny_cfg):
    model = GPT(tiny_cfg)
    idx = torch.randint(0, 256, (2, 24))
    base = model(idx).logits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = GrowConfig(experts=2, steps=8, gate_windows=8, lr=1e-2)  # select: posterior, the default
    with pytest.raises(ConfigError, match="base path's text"):  # the first path sketches path 0 from held-in text
        grow.grow(model, [0, 1], NOVEL, {}, cfg, TCFG)
    added, curves, stats = grow.grow(model, [0, 1], NOVEL, HELD_IN, cfg, TCFG)
    assert added == [(0, 4), (0, 5), (1, 4), (1, 5)] and model.n_paths == 2 and len(curves["train"]) == 8
    assert [s["path"] for s in stats] == [1, 1]
    assert len(model.path_sketches) == 2 and model.inference == "select_base"
    assert_only_appended(before, model.state_dict())
    assert model.moe(0).router.gate_path.tolist() == [1] and model.moe(0).router.expert_gate.tolist()[-2:] == [0, 0]
    with model.on_path(0):
        assert torch.equal(model(idx).logits, base)
        start = evaluate(model, NOVEL, 4).bpb
    with model.on_path(1):
        one = model(idx).logits
        assert evaluate(model, NOVEL, 4).bpb < start  # the path learned the novel text
    # A second growth: a new path whose experts start from the base experts, never from path 1's.
    steps0 = dataclasses.replace(cfg, steps=0)
    grow.grow(model, [0, 1], HELD_IN["python"], NoText(), steps0, TCFG)
    base_weights = [e.up.weight for e in model.moe(0).experts[:4]]
    assert all(any(torch.equal(e.up.weight, w) for w in base_weights) for e in model.moe(0).experts[6:])
    with model.on_path(1):
        assert torch.equal(model(idx).logits, one)
    with pytest.raises(ConfigError, match="grow.select: gate, but this model grew paths"):
        grow.grow(model, [0], NOVEL, HELD_IN, GrowConfig(select="gate", experts=1, steps=0, gate_windows=8), TCFG)
    gated = GPT(tiny_cfg)
    grow.grow(gated, [0], NOVEL, HELD_IN, GrowConfig(select="gate", experts=1, steps=0, gate_windows=8), TCFG)
    with pytest.raises(ConfigError, match="grow.select: posterior, but this model grew learned gates"):
        grow.grow(gated, [0], NOVEL, HELD_IN, cfg, TCFG)


def test_a_repeat_drop_consolidates_its_own_path_and_leaves_everything_else_bit_identical(tiny_cfg):
    german, python = (corpus_records(d, 160) for d in ("german", "python"))
    model = GPT(tiny_cfg)
    cfg = GrowConfig(experts=2, steps=6, gate_windows=8, lr=1e-2)
    grow.grow(model, [0, 1], torch.cat(german[:120]), HELD_IN, cfg, TCFG)  # path 1: German
    grow.grow(model, [0, 1], torch.cat(python[:120]), HELD_IN, cfg, TCFG)  # path 2: python
    drop = german[120:]
    todo = grow.plan(model.path_sketches, drop, min_records=8)
    assert set(todo.consolidate) == {1} and len(todo.consolidate[1]) >= 36 and not todo.grow
    assert sorted(todo.consolidate[1] + todo.left) == list(range(40))  # too few for a path of their own: left
    assert grow.path_experts(model, 1) == [(0, 4), (0, 5), (1, 4), (1, 5)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    held_out = torch.cat(german[140:])
    with model.on_path(1):
        start = evaluate(model, held_out, 4).bpb
    new = torch.cat([drop[i] for i in todo.consolidate[1]])
    curve = grow.consolidate_path(model, 1, new, new, 8, cfg, TCFG)
    assert len(curve) == 8
    with model.on_path(1):
        assert evaluate(model, held_out, 4).bpb < start
    after = model.state_dict()
    mine = {f"blocks.{layer}.ffn.experts.{e}." for layer, e in grow.path_experts(model, 1)}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(tuple(mine)) or k.endswith(".router.keys") for k in changed)
    for layer in range(2):  # only path 1's keys moved (one EMA step toward the new tokens routed to them)
        keys_before, keys_after = before[f"blocks.{layer}.ffn.router.keys"], after[f"blocks.{layer}.ffn.router.keys"]
        moved = (keys_before != keys_after).any(-1).nonzero()[:, 0].tolist()
        assert moved and set(moved) <= {4, 5}


def test_records_no_path_explains_grow_a_path_and_a_small_known_group_joins_them(tiny_cfg):
    german, kjv = corpus_records("german", 150), corpus_records("kjv", 40, skip=200)
    model = GPT(tiny_cfg)
    grow.grow(model, [0, 1], torch.cat(german[:120]), HELD_IN, GrowConfig(experts=1, steps=0, gate_windows=8), TCFG)
    todo = grow.plan(model.path_sketches, kjv + german[120:126], min_records=8)
    assert not todo.consolidate and len(todo.grow) == 46 and not todo.left  # 6 German records join the 40 novel
    todo = grow.plan(model.path_sketches, kjv[:5] + german[120:150], min_records=8)
    assert list(todo.consolidate) == [1] and todo.left == list(range(5)) and not todo.grow
    assert grow.path_domains({"learned_domains": ["a", "b", "c", "d"]}, 3) == [["a", "b"], ["c"], ["d"]]
    assert grow.path_domains({"learned_domains": ["a"], "path_domains": [["a"], ["c", "d"]]}, 2) == [["a"], ["c", "d"]]
