import pytest
import torch
import torch.nn as nn

from hst.config import ModelConfig
from hst.experts import MoE, Expert, dispatch, reference_dispatch
from hst.router import SKIPPED


def naive_per_token(x, ids, w, experts):
    """The definition, one token and one slot at a time."""
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for j in range(ids.shape[1]):
            out[n] += w[n, j] * experts[int(ids[n, j])](x[n:n + 1])[0]
    return out


@pytest.fixture
def pool():
    experts = nn.ModuleList(Expert(16, 24) for _ in range(5))
    for e in experts:
        e.reset_parameters(0.2, 1)
    return experts


def test_dispatch_equals_the_naive_reference(pool):
    x = torch.randn(64, 16)
    ids = torch.stack([torch.randperm(5)[:2] for _ in range(64)])
    w = torch.softmax(torch.randn(64, 2), -1)
    want = naive_per_token(x, ids, w, pool)
    assert torch.allclose(dispatch(x, ids, w, pool), want, atol=1e-5)
    assert torch.allclose(reference_dispatch(x, ids, w, pool), want, atol=1e-5)


def test_dispatch_gradients_equal_the_reference(pool):
    x = torch.randn(32, 16, requires_grad=True)
    ids = torch.stack([torch.randperm(5)[:2] for _ in range(32)])
    w = torch.softmax(torch.randn(32, 2), -1)
    g1 = torch.autograd.grad(dispatch(x, ids, w, pool).square().sum(), [x, *pool.parameters()])
    g2 = torch.autograd.grad(naive_per_token(x, ids, w, pool).square().sum(), [x, *pool.parameters()])
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-5)


def test_only_selected_experts_run(pool):
    calls = []
    for e, expert in enumerate(pool):
        expert.register_forward_hook(lambda m, i, o, e=e: calls.append((e, i[0].shape[0])))
    ids = torch.tensor([[0, 3], [3, 0], [0, 3]])
    dispatch(torch.randn(3, 16), ids, torch.full((3, 2), 0.5), pool)
    assert sorted(calls) == [(0, 3), (3, 3)]


def test_skipped_slots_run_nothing_and_add_nothing(pool):
    calls = []
    for e, expert in enumerate(pool):
        expert.register_forward_hook(lambda m, i, o, e=e: calls.append((e, i[0].shape[0])))
    x = torch.randn(4, 16)
    ids = torch.tensor([[1, SKIPPED, SKIPPED], [2, 1, SKIPPED], [1, 4, 2], [2, SKIPPED, SKIPPED]])
    w = torch.tensor([[1.0, 0, 0], [0.6, 0.4, 0], [0.5, 0.3, 0.2], [1.0, 0, 0]])
    out = dispatch(x, ids, w, pool)
    assert sorted(calls) == [(1, 3), (2, 3), (4, 1)]
    assert torch.allclose(out, reference_dispatch(x, ids, w, pool), atol=1e-6)
    assert torch.allclose(out[0], pool[1](x[:1])[0], atol=1e-6)


def test_top_any_moe_with_floor_equals_the_per_token_sum_over_kept_experts():
    cfg = ModelConfig(d_model=16, n_head=2, n_experts=4, top_k=1, expert_hidden=8, ffn="learned",
                      routing="top_any", router_floor=0.2)
    moe = MoE(cfg, 4)
    x = torch.randn(2, 5, 16)
    out, r = moe(x)
    kept = r.expert_ids != SKIPPED
    assert kept.sum() < kept.numel()  # some slots are skipped at this floor
    want = naive_per_token(x.reshape(-1, 16), r.expert_ids.clamp_min(0), r.weights, moe.experts)
    assert torch.allclose(out.reshape(-1, 16), want, atol=1e-5)


def test_one_expert_moe_equals_the_dense_ffn():
    cfg = ModelConfig(d_model=16, n_head=2, n_experts=1, top_k=1, expert_hidden=24)
    moe = MoE(cfg, 1)
    dense = Expert(16, 24)
    dense.load_state_dict(moe.experts[0].state_dict())
    x = torch.randn(3, 7, 16)
    out, routing = moe(x)
    assert torch.allclose(out, dense(x), atol=1e-6)
    assert torch.equal(routing.weights, torch.ones(21, 1))


def grow_setup():
    cfg = ModelConfig(d_model=16, n_head=2, n_experts=4, top_k=2, expert_hidden=24)
    moe = MoE(cfg, 4)
    for e in moe.experts:
        e.reset_parameters(0.2, 1)
    return moe, torch.randn(200, 16)


@pytest.mark.parametrize("init", ["copy_nearest", "random"])
def test_add_expert_leaves_tokens_that_do_not_route_to_it_unchanged(init):
    moe, x = grow_setup()
    before, r0 = moe(x)
    new = moe.add_expert(x[0], init=init)
    after, r1 = moe(x)
    assert new == 4 and len(moe.experts) == 5 and moe.router.keys.shape == (5, 16)
    uses_new = (r1.expert_ids == new).any(-1)
    assert uses_new[0] and 0 < int(uses_new.sum()) < 200
    assert torch.equal(after[~uses_new], before[~uses_new])
    assert torch.equal(r1.expert_ids[~uses_new], r0.expert_ids[~uses_new])


def test_add_expert_copy_nearest_copies_the_most_similar_expert():
    moe, _ = grow_setup()
    key = moe.router.keys[2] + 0.01 * torch.randn(16)
    new = moe.add_expert(key, init="copy_nearest")
    for a, b in zip(moe.experts[new].parameters(), moe.experts[2].parameters()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()


def test_add_expert_rejects_unknown_init_and_learned_router():
    moe, x = grow_setup()
    with pytest.raises(ValueError, match="init"):
        moe.add_expert(x[0], init="zeros")
    learned = MoE(ModelConfig(d_model=16, n_head=2, ffn="learned", n_experts=4), 4)
    with pytest.raises(ValueError, match="key router"):
        learned.add_expert(x[0])


def test_moe_updates_keys_only_when_asked():
    moe, x = grow_setup()
    keys = moe.router.keys.clone()
    moe(x)
    assert torch.equal(moe.router.keys, keys)
    moe(x, update_keys=True)
    assert not torch.equal(moe.router.keys, keys)
