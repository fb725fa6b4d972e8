import copy
import dataclasses

import torch
from test_grow import HELD_IN, HELD_IN_ALL, NOVEL, TCFG, assert_only_appended

from hst import gates
from hst.config import GrowConfig
from hst.evaluation import evaluate, ffn_inputs, routing_stability
from hst.model import GPT
from hst.router import Gate, gate_scores
from hst.train import only_trainable, train


def test_growth_adds_gated_experts_and_trains_only_them(tiny_cfg):
    model = GPT(tiny_cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    added, curves, stats = gates.grow(model, [0, 1], NOVEL, HELD_IN, GrowConfig(select="gate", experts=1, steps=5, gate_windows=8), TCFG)
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
        gates.grow(model, [0], NOVEL, HELD_IN, GrowConfig(select="gate", experts=1, steps=0, gate_windows=8, init="random"),
                  dataclasses.replace(TCFG, seed=seed))
        return model.moe(0).experts[-1].up.weight

    assert torch.equal(new_expert(global_seed=1, seed=0), new_expert(global_seed=2, seed=0))
    assert not torch.equal(new_expert(global_seed=1, seed=0), new_expert(global_seed=1, seed=1))


def test_gates_keep_held_in_routing_and_admit_novel_tokens(tiny_cfg):
    model = GPT(tiny_cfg)
    old = evaluate(model, HELD_IN_ALL, 8).expert_ids
    _, _, stats = gates.grow(model, [0, 1], NOVEL, HELD_IN, GrowConfig(select="gate", experts=1, steps=0, gate_windows=8, gate_fpr=0.02), TCFG)
    assert all(s["held_in_tokens_passing"] <= 0.05 and s["novel_tokens_passing"] > 0.5 for s in stats)
    # Held-in tokens whose gates stay closed keep their routing (untrained new experts change nothing else).
    assert min(routing_stability(old, evaluate(model, HELD_IN_ALL, 8).expert_ids)) >= 0.95
    new_ids = evaluate(model, NOVEL, 8).expert_ids
    assert all((ids == 4).any(-1).float().mean() > 0.3 for ids in new_ids)


def test_new_key_is_the_mean_of_the_novel_tokens_passing_the_gate(tiny_cfg):
    model = GPT(tiny_cfg)
    router = model.moe(1).router
    feats = router.features(ffn_inputs(model, NOVEL, [1], 8)[0])
    gates.grow(model, [1], NOVEL, HELD_IN, GrowConfig(select="gate", experts=1, steps=0, gate_windows=8), TCFG)
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
    added, _, stats = gates.grow(model, [0, 1], NOVEL, HELD_IN, GrowConfig(select="gate", experts=3, steps=4, gate_windows=8), TCFG)
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


def test_each_source_gets_at_most_the_false_positive_rate(tiny_cfg):
    model = GPT(tiny_cfg)
    _, _, stats = gates.grow(model, [0, 1], NOVEL, HELD_IN, GrowConfig(select="gate", steps=0, gate_windows=8, gate_fpr=0.05), TCFG)
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
        gates.grow(model, [0], NOVEL, HELD_IN, GrowConfig(select="gate", experts=1, steps=2, gate_windows=8), TCFG)
        before, start = {k: v.clone() for k, v in model.state_dict().items()}, copy.deepcopy(model)
        held_in = {**HELD_IN, "german": NOVEL}
        added, curves, _ = gates.grow(model, [0], SECOND, held_in,
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
    results, measure, runs = {}, gates.evaluate, []
    for tight in (False, True):
        if tight:
            def doubled(*args, layers=(), only=None):
                out = measure(*args, layers=layers, only=only)
                if only is None:  # the start model's passes
                    return out
                runs.append(int(only.sum()))
                return out._replace(window_bpb=out.window_bpb * 2)
            monkeypatch.setattr(gates, "evaluate", doubled)
        model = GPT(tiny_cfg)
        start = copy.deepcopy(model)  # the gates are fitted on the start model's features
        _, curves, stats = gates.grow(model, [0, 1], NOVEL, HELD_IN,
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
    _, curves, stats = gates.grow(model, [0, 1], NOVEL, HELD_IN,
                                 GrowConfig(select="gate", experts=1, steps=5, gate_windows=8, gate_fpr=0.2, forgetting_budget=0.5), TCFG)
    moved = 0
    for src, tokens in HELD_IN.items():
        full, before = evaluate(model, tokens, 8), evaluate(start, tokens, 8)
        assert abs(curves["held_in_bpb_change"][src] - (full.bpb / before.bpb - 1)) < 1e-6
        routers = [model.moe(layer).router for layer in (0, 1)]  # one gate each, the last
        scores = [(layer, len(r.gate_b) - 1, gate_scores(r.features(x), Gate(*(t[-1] for t in r.gates))))
                  for layer, r, x in zip((0, 1), routers, ffn_inputs(start, tokens, [0, 1], 8))]
        opened = gates.opened_windows(model, scores)
        assert torch.allclose(full.window_bpb[~opened], before.window_bpb[~opened], rtol=0, atol=1e-6)
        moved += int((full.window_bpb[opened] - before.window_bpb[opened]).abs().gt(1e-4).sum())
    assert moved > 0  # the windows a gate opens in did change
