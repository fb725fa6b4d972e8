import dataclasses

import pytest
import torch
import torch.nn as nn

from hst import checkpoint
from hst.config import ConfigError, ModelConfig, TrainConfig
from hst.consolidate import consolidate_expert
from hst.experts import Expert, MoE
from hst.model import GPT
from hst.params import build
from hst.sparse import SparseLinear, Topology, live_count, path_counts, prune_and_regrow, random_mask
from hst.train import make_optimizer, train, train_step

TEXT = torch.tensor(list(b"the quick brown fox jumps over the lazy dog. " * 60), dtype=torch.uint8)


def sparse_layers(model):
    return [m for m in model.modules() if isinstance(m, SparseLinear)]


def test_random_mask_has_the_exact_live_count():
    for density in (0.05, 0.3, 1e-9):
        mask = random_mask((24, 16), density)
        assert mask.dtype == torch.bool and int(mask.sum()) == live_count(24 * 16, density)
    assert live_count(384, 1e-9) == 1


def test_density_one_is_the_unchanged_dense_expert():
    torch.manual_seed(0)
    expert = Expert(16, 24)
    expert.reset_parameters(0.2, 2)
    torch.manual_seed(0)  # the pre-sparsity Expert: two bias-free Linears, same init calls
    up, down = nn.Linear(16, 24, bias=False), nn.Linear(24, 16, bias=False)
    nn.init.normal_(up.weight, std=0.2)
    nn.init.normal_(down.weight, std=0.2 / 2)
    assert type(expert.up) is nn.Linear and set(expert.state_dict()) == {"up.weight", "down.weight"}
    assert torch.equal(expert.up.weight, up.weight) and torch.equal(expert.down.weight, down.weight)
    x = torch.randn(50, 16)
    assert torch.equal(expert(x), down(torch.relu(up(x)).square()))


def test_full_mask_computes_exactly_what_the_dense_linear_does():
    layer = SparseLinear(16, 24, 0.5)
    layer.mask.fill_(True)
    dense = nn.Linear(16, 24, bias=False)
    dense.weight.data.copy_(layer.weight)
    x = torch.randn(30, 16)
    assert torch.equal(layer(x), dense(x))


def test_sparse_init_keeps_the_pre_activation_scale():
    torch.manual_seed(0)
    x = torch.randn(4000, 256)
    stds = {}
    for density in (1.0, 0.05):
        expert = Expert(256, 256, density)
        expert.reset_parameters(0.02, 4)
        with torch.no_grad():
            stds[density] = float(expert.up(x).std())
        if density < 1:
            assert int((expert.up.weight != 0).sum()) <= live_count(256 * 256, density)
    assert stds[0.05] == pytest.approx(stds[1.0], rel=0.1)


def sparse_cfg(tiny_cfg, density=0.1):
    return dataclasses.replace(tiny_cfg, expert_density=density)


def test_dead_weights_and_their_optimizer_state_stay_exactly_zero(tiny_cfg):
    model = GPT(sparse_cfg(tiny_cfg))
    cfg = TrainConfig(domains=("a",), steps=8, lr=1e-2, warmup_steps=1, weight_decay=0.1, grad_clip=0.5,
                      precision="fp32")
    opt = make_optimizer(model, cfg)
    topology = Topology(model, opt, every=3, fraction=0.3, regrow="gradient", total_steps=100)
    gen = torch.Generator().manual_seed(0)
    masks_seen = []
    for step in range(1, 9):
        x = torch.randint(0, 256, (4, 32), generator=gen)
        train_step(model, opt, x, x.roll(-1, 1), cfg, None)
        before = [layer.mask.clone() for layer in topology.layers]
        topology.after_step(step)
        masks_seen.append([(b, layer.mask.clone()) for b, layer in zip(before, topology.layers)])
    assert topology.moved > 0
    for layer in sparse_layers(model):
        dead = ~layer.mask
        assert torch.all(layer.weight[dead] == 0)
        state = opt.state[layer.weight]
        assert torch.all(state["exp_avg"][dead] == 0) and torch.all(state["exp_avg_sq"][dead] == 0)
        assert torch.any(layer.weight[layer.mask] != 0)
    # The checks above cover connections pruned at step 6 (live, with non-zero moments, until then)
    # after two more steps with weight decay.
    assert all(torch.any(before & ~after) for before, after in masks_seen[5])


def layer_with(weight, grad, mask):
    layer = SparseLinear(weight.shape[1], weight.shape[0], 0.5)
    layer.mask.copy_(mask)
    layer.weight.data.copy_(weight * mask)
    layer.window_grad = grad.clone()
    return layer


def test_prune_moves_the_lowest_importance_connections_to_the_largest_gradients():
    mask = torch.tensor([[True, True, False], [True, False, False]])
    weight = torch.tensor([[1.0, 0.1, 0.0], [2.0, 0.0, 0.0]])
    grad = torch.tensor([[1.0, 5.0, 0.2], [0.1, 3.0, 0.1]])  # importance |w·g| = 1.0, 0.5, 0.2 at live
    layer = layer_with(weight, grad, mask)
    state = {"exp_avg": torch.ones(2, 3), "exp_avg_sq": torch.ones(2, 3), "step": torch.tensor(4.0)}
    moved = prune_and_regrow(layer, 0.7, "gradient", state, torch.Generator())
    assert moved == 2
    # dropped: (1, 0) (importance 0.2) and (0, 1) (0.5); grown: (1, 1) and (0, 2), the largest |g| among
    # positions dead before the update
    assert layer.mask.tolist() == [[True, False, True], [False, True, False]]
    assert layer.weight.tolist() == [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    for key in ("exp_avg", "exp_avg_sq"):
        assert state[key].tolist() == [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    assert int(layer.mask.sum()) == 3


def test_common_neighbors_grows_where_most_length_3_paths_join():
    mask = torch.tensor([[True, True, False], [True, False, False], [False, False, False]])
    # output 1 shares input 0 with output 0, which also feeds input 1: one path 1-0-0-1
    assert path_counts(mask)[1, 1] == 1 and path_counts(mask)[2, 2] == 0
    weight = torch.tensor([[1.0, 1.0, 0.0], [0.1, 0.0, 0.0], [0.0, 0.0, 0.0]])
    layer = layer_with(weight, torch.ones(3, 3), mask)
    prune_and_regrow(layer, 0.4, "common_neighbors", {}, torch.Generator().manual_seed(0))
    # drop (1, 0), the weakest; before the update (1, 1) has the most paths among dead positions
    assert not layer.mask[1, 0] and layer.mask[1, 1] and int(layer.mask.sum()) == 3


def test_training_evolves_every_expert_and_keeps_live_counts(tiny_cfg):
    torch.manual_seed(0)
    model = GPT(sparse_cfg(tiny_cfg))
    masks = [layer.mask.clone() for layer in sparse_layers(model)]
    cfg = TrainConfig(domains=("a",), steps=9, batch_size=4, warmup_steps=1, eval_every=100, eval_windows=2,
                      precision="fp32", topology_every=4, topology_prune=0.2)
    curves = train(model, cfg, {"a": TEXT}, {})
    layers = sparse_layers(model)
    assert curves["topology"]["layers"] == len(layers) == 2 * 2 * 4  # up/down x experts x layers
    assert curves["topology"]["moved"] > 0
    assert all(int(l.mask.sum()) == int(m.sum()) for l, m in zip(layers, masks))
    assert sum(not torch.equal(l.mask, m) for l, m in zip(layers, masks)) > len(layers) // 2
    assert all(layer.window_grad is None for layer in layers)


def test_dense_training_reports_no_topology(tiny_cfg):
    cfg = TrainConfig(domains=("a",), steps=2, batch_size=2, warmup_steps=1, eval_every=100, precision="fp32",
                      topology_every=1)
    assert train(GPT(tiny_cfg), cfg, {"a": TEXT}, {})["topology"] == {"layers": 0, "updates": 0, "moved": 0}


def test_consolidation_evolves_only_the_consolidated_expert(tiny_cfg):
    torch.manual_seed(0)
    model = GPT(sparse_cfg(tiny_cfg))
    masks = {name: b.clone() for name, b in model.named_buffers() if name.endswith("mask")}
    cfg = TrainConfig(steps=6, batch_size=4, warmup_steps=1, eval_every=100, precision="fp32",
                      topology_every=2, topology_prune=0.2)
    curves = consolidate_expert(model, 1, 2, TEXT, TEXT[:600], cfg)
    assert curves["topology"]["layers"] == 2 and curves["topology"]["moved"] > 0
    changed = {name for name, b in model.named_buffers() if name.endswith("mask") and not torch.equal(b, masks[name])}
    assert changed and all(name.startswith("blocks.1.ffn.experts.2.") for name in changed)


def test_checkpoint_round_trip_keeps_the_masks(tiny_cfg, tmp_path):
    model = GPT(sparse_cfg(tiny_cfg))
    model.add_expert(0, torch.randn(32), init="random")
    layer = model.moe(0).experts[1].up
    layer.window_grad = torch.randn_like(layer.weight)
    prune_and_regrow(layer, 0.5, "gradient", {}, torch.Generator())
    layer.window_grad = None
    checkpoint.save(tmp_path / "m.pt", model)
    loaded, _ = checkpoint.load(tmp_path / "m.pt", expect=model.cfg)
    assert loaded.n_experts == [5, 4]
    for a, b in zip(sparse_layers(model), sparse_layers(loaded)):
        assert torch.equal(a.mask, b.mask) and torch.equal(a.weight, b.weight)
    idx = torch.randint(0, 256, (2, 32))
    model.eval(), loaded.eval()
    assert torch.equal(model(idx).logits, loaded(idx).logits)


def test_add_expert_copies_or_draws_masks():
    cfg = ModelConfig(d_model=16, n_head=2, n_experts=4, expert_hidden=24, expert_density=0.25)
    moe = MoE(cfg, 4)
    nearest = moe.add_expert(moe.router.keys[2] + 0.01 * torch.randn(16), init="copy_nearest")
    fresh = moe.add_expert(torch.randn(16), init="random")
    copy, source, drawn = moe.experts[nearest].up, moe.experts[2].up, moe.experts[fresh].up
    assert torch.equal(copy.mask, source.mask) and copy.mask.data_ptr() != source.mask.data_ptr()
    assert not torch.equal(drawn.mask, source.mask)
    assert int(drawn.mask.sum()) == int(source.mask.sum()) == live_count(16 * 24, 0.25)
    assert torch.all(drawn.weight[~drawn.mask] == 0) and torch.any(drawn.weight != 0)


@pytest.mark.parametrize("section, key", [
    ({"expert_density": 0.0}, "expert_density"), ({"expert_density": 1.5}, "expert_density")])
def test_density_is_validated(section, key):
    with pytest.raises(ConfigError, match=f"model.{key}"):
        build(ModelConfig, section, "model")


@pytest.mark.parametrize("section, key", [
    ({"topology_every": -1}, "topology_every"), ({"topology_prune": 1.0}, "topology_prune"),
    ({"topology_regrow": "random"}, "topology_regrow")])
def test_topology_fields_are_validated(section, key):
    with pytest.raises(ConfigError, match=f"pretrain.{key}"):
        build(TrainConfig, section, "pretrain")
