import dataclasses

import pytest
import torch
from project import corpus_records

from hst import data, gates, grow, paths, sketches
from hst.config import ConfigError, GrowConfig, TrainConfig
from hst.evaluation import evaluate
from hst.model import GPT

NOVEL = torch.tensor(list("Über allen Gipfeln ist Ruh, in allen Wipfeln spürest du kaum einen Hauch; ".encode() * 30),
                      dtype=torch.uint8)
HELD_IN_TEXT = {"python": "def f(x):\n    return x + 1\n" * 20, "shakespeare": "To be, or not to be, that is the question. " * 20}
HELD_IN = {d: data.encode([t]) for d, t in HELD_IN_TEXT.items()}  # per source, as the gates are calibrated
HELD_IN_ALL = data.encode(list(HELD_IN_TEXT.values()))
TCFG = TrainConfig(batch_size=4, warmup_steps=1, eval_every=5, eval_windows=2, precision="fp32")


def assert_only_appended(before: dict, after: dict) -> None:
    """Every tensor of ``before`` is in ``after`` bit for bit: routers' keys, gates, paths and sketches appended to, the rest equal."""
    for k, v in before.items():
        grown = k.split(".")[-1] in ("keys", "expert_gate", "expert_path", "path_sketches") or k.split(".")[-1].startswith("gate_")
        assert v.numel() == 0 or torch.equal(after[k][:len(v)] if grown else after[k], v), k  # numel 0: no gate yet


def test_spherical_kmeans_is_the_normalized_mean_for_one_cluster_and_separates_two():
    x = torch.nn.functional.normalize(torch.randn(50, 8), dim=-1)
    assert torch.equal(grow.spherical_kmeans(x, 1)[0], torch.nn.functional.normalize(x.mean(0), dim=-1))
    a, b = torch.zeros(8), torch.zeros(8)
    a[0], b[1] = 1, 1
    pts = torch.nn.functional.normalize(torch.cat([a + 0.05 * torch.randn(20, 8), b + 0.05 * torch.randn(20, 8)]), dim=-1)
    c = grow.spherical_kmeans(pts, 2)
    assert sorted(int(v.abs().argmax()) for v in c) == [0, 1]


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
    assert sketches.count(model.path_sketches) == 3 and model.inference == "select_base"  # path 0: one per domain
    assert_only_appended(before, model.state_dict())
    assert model.moe(0).router.expert_path.tolist() == [0, 0, 0, 0, 1, 1] and len(model.moe(0).router.gate_b) == 0
    assert list(model.path_heads) == ["1"] and not torch.equal(model.path_heads["1"], model.lm_head.weight)  # trained
    assert torch.equal(model(idx, path=0).logits, base)
    start = evaluate(model, NOVEL, 4, path=0).bpb
    one = model(idx, path=1).logits
    assert evaluate(model, NOVEL, 4, path=1).bpb < start  # the path learned the novel text
    # A second growth: a new path whose experts start from the base experts, never from path 1's.
    after_path_1 = {k: v.clone() for k, v in model.state_dict().items()}
    steps0 = dataclasses.replace(cfg, steps=0, head="shared")
    grow.grow(model, [0, 1], HELD_IN["python"], NoText(), steps0, TCFG)
    assert list(model.path_heads) == ["1"]  # head: shared, path 2 reads path 0's
    base_weights = [e.up.weight for e in model.moe(0).experts[:4]]
    assert all(any(torch.equal(e.up.weight, w) for w in base_weights) for e in model.moe(0).experts[6:])
    # Path 1's weights are bit-identical (assert_only_appended); its logits are equal to float rounding:
    # the router's score matmul is wider by path 2's keys, and a BLAS may sum a column in another order
    # at another width (1.5e-7 seen on an AMD EPYC)
    assert torch.allclose(model(idx, path=1).logits, one, rtol=0, atol=1e-5)
    assert_only_appended(after_path_1, model.state_dict())
    with pytest.raises(ConfigError, match="grow.select: gate, but this model grew paths"):
        gates.grow(model, [0], NOVEL, HELD_IN, GrowConfig(select="gate", experts=1, steps=0, gate_windows=8), TCFG)
    gated = GPT(tiny_cfg)
    gates.grow(gated, [0], NOVEL, HELD_IN, GrowConfig(select="gate", experts=1, steps=0, gate_windows=8), TCFG)
    with pytest.raises(ConfigError, match="grow.select: posterior, but this model grew learned gates"):
        grow.grow(gated, [0], NOVEL, HELD_IN, cfg, TCFG)


def test_a_repeat_drop_consolidates_its_own_path_and_leaves_everything_else_bit_identical(tiny_cfg):
    german, python = (corpus_records(d, 160) for d in ("german", "python"))
    model = GPT(tiny_cfg)
    cfg = GrowConfig(experts=2, steps=6, gate_windows=8, lr=1e-2)
    grow.grow(model, [0, 1], torch.cat(german[:120]), HELD_IN, cfg, TCFG)  # path 1: German
    grow.grow(model, [0, 1], torch.cat(python[:120]), HELD_IN, cfg, TCFG)  # path 2: python
    drop = german[120:]
    todo = grow.plan(paths.grown(model.path_sketches, model.n_paths), drop, min_records=8)
    assert set(todo.consolidate) == {1} and len(todo.consolidate[1]) >= 36 and not todo.grow
    assert sorted(todo.consolidate[1] + todo.left) == list(range(40))  # too few for a path of their own: left
    assert grow.path_experts(model, 1) == [(0, 4), (0, 5), (1, 4), (1, 5)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    held_out = torch.cat(german[140:])
    start = evaluate(model, held_out, 4, path=1).bpb
    new = torch.cat([drop[i] for i in todo.consolidate[1]])
    curve = grow.consolidate_path(model, 1, new, new, 8, cfg, TCFG)
    assert len(curve) == 8
    assert evaluate(model, held_out, 4, path=1).bpb < start
    after = model.state_dict()
    mine = {f"blocks.{layer}.ffn.experts.{e}." for layer, e in grow.path_experts(model, 1)}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # Only path 1's experts, keys and sketch moved: its own head stays as growth left it.
    assert changed & {f"{m}up.weight" for m in mine} and all(k.startswith(tuple(mine)) or k.endswith(".router.keys")
                                                             or k == "path_sketches" for k in changed)
    # Path 1's sketch (after path 0's two, one per held-in domain) now counts the new records too.
    old, now = sketches.unstack(before["path_sketches"]), sketches.unstack(after["path_sketches"])
    assert len(now) == 4 and torch.equal(now[2], sketches.add_sketches(old[2], sketches.fit_sketch(new)))
    assert all(torch.equal(now[i], old[i]) for i in (0, 1, 3))
    for layer in range(2):  # only path 1's keys moved (one EMA step toward the new tokens routed to them)
        keys_before, keys_after = before[f"blocks.{layer}.ffn.router.keys"], after[f"blocks.{layer}.ffn.router.keys"]
        moved = (keys_before != keys_after).any(-1).nonzero()[:, 0].tolist()
        assert moved and set(moved) <= {4, 5}


def test_records_no_path_explains_grow_a_path_and_a_small_known_group_joins_them(tiny_cfg):
    german, kjv = corpus_records("german", 150), corpus_records("kjv", 40, skip=200)
    model = GPT(tiny_cfg)
    grow.grow(model, [0, 1], torch.cat(german[:120]), HELD_IN, GrowConfig(experts=1, steps=0, gate_windows=8), TCFG)
    todo = grow.plan(paths.grown(model.path_sketches, model.n_paths), kjv + german[120:126], min_records=8)
    assert not todo.consolidate and len(todo.grow) == 46 and not todo.left  # 6 German records join the 40 novel
    todo = grow.plan(paths.grown(model.path_sketches, model.n_paths), kjv[:5] + german[120:150], min_records=8)
    assert list(todo.consolidate) == [1] and todo.left == list(range(5)) and not todo.grow
    assert grow.path_domains({"learned_domains": ["a", "b", "c", "d"]}, 3) == [["a", "b"], ["c"], ["d"]]
    assert grow.path_domains({"learned_domains": ["a"], "path_domains": [["a"], ["c", "d"]]}, 2) == [["a"], ["c", "d"]]
