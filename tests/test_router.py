import pytest
import torch
import torch.nn.functional as F

from hst.router import GATE_PRIOR_TOKENS, SKIPPED, Gate, KeyRouter, LearnedRouter, causal_mean, gate_open


def make_router(**kw):
    args = dict(d_model=8, n_experts=4, top_k=2, temperature=0.1, momentum=0.9)
    args.update(kw)
    return KeyRouter(**args)


def test_key_routing_is_cosine_topk_with_tempered_softmax():
    r = make_router()
    x = torch.randn(20, 8) * 5
    out = r(x)
    sim = F.normalize(x, dim=-1) @ F.normalize(r.keys, dim=-1).T
    top, idx = sim.sort(dim=-1, descending=True)
    assert torch.equal(out.expert_ids, idx[:, :2])
    assert torch.allclose(out.weights, F.softmax(top[:, :2] / 0.1, dim=-1))
    assert torch.allclose(out.max_sim, top[:, 0])
    assert torch.allclose(out.belief.sum(-1), torch.ones(20))


def test_keys_are_a_buffer_and_get_no_gradient():
    r = make_router()
    assert "keys" in dict(r.named_buffers()) and not list(r.parameters())
    x = torch.randn(10, 8, requires_grad=True)
    r(x).weights[:, 0].sum().backward()
    assert r.keys.grad is None
    assert x.grad is not None and x.grad.abs().sum() > 0  # routing still shapes the residual stream


def test_causal_mean_averages_each_prefix():
    s = torch.tensor([[1.0, 3.0, 2.0], [0.0, 0.0, 6.0]])
    assert torch.allclose(causal_mean(s), torch.tensor([[1.0, 2.0, 2.0], [0.0, 0.0, 2.0]]))
    assert causal_mean(torch.ones(2, 3, 4)).shape == (2, 3, 4)
    # prior pseudo-observations of 0 pull the first positions toward 0
    assert torch.allclose(causal_mean(torch.tensor([[2.0, 2.0]]), prior=2), torch.tensor([[2 / 3, 1.0]]))


def test_gated_expert_is_eligible_only_where_its_gate_opens():
    r = make_router(n_experts=3, top_k=2)
    before = make_router(n_experts=3, top_k=2)
    before.keys.copy_(r.keys)
    w = torch.zeros(8)
    w[0] = 1.0
    r.add_key(w.clone(), gate=r.add_gate(Gate.linear(w, 0.0, -0.5)))  # open where the running mean of feature 0 exceeds 0.5
    x = torch.randn(2, 12, 8)
    x[0, :, 0] = -5.0  # sequence 0: feature 0 strongly negative -> gate closed everywhere
    x[1, :, 0] = 50.0  # sequence 1: feature 0 dominates -> gate open, and the new key is the best match
    out, ref = r(x), before(x)
    closed = slice(0, 12)  # the tokens of sequence 0
    assert torch.equal(out.expert_ids[closed], ref.expert_ids[closed])
    assert torch.equal(out.weights[closed], ref.weights[closed])
    assert torch.equal(out.belief[closed, :3], ref.belief[closed]) and (out.belief[closed, 3] == 0).all()
    # In sequence 1 the running mean (which starts from GATE_PRIOR_TOKENS zeros) passes 0.5 later on.
    assert (out.expert_ids[12 + 2 * GATE_PRIOR_TOKENS:] == 3).any(-1).all()
    assert torch.equal(r.eligible(r.features(x))[..., 3], gate_open(r.features(x), Gate.linear(w, 0.0, -0.5)))


def test_a_paths_experts_are_eligible_exactly_on_that_path_per_sequence():
    r = make_router(n_experts=2, top_k=1)
    r.add_key(torch.randn(8), path=1)
    r.add_key(torch.randn(8), path=2)
    assert r.n_paths == 3 and r.expert_path.tolist() == [0, 0, 1, 2]
    eligible = r.eligible(r.features(torch.randn(3, 5, 8)), torch.tensor([0, 1, 2]))  # one path per sequence
    assert eligible[0].tolist() == [[True, True, False, False]] * 5
    assert eligible[1].tolist() == [[True, True, True, False]] * 5
    assert eligible[2].tolist() == [[True, True, False, True]] * 5


def test_gate_looks_only_at_earlier_tokens():
    r = make_router(n_experts=2, top_k=1)
    w = torch.zeros(8)
    w[0] = 1.0
    r.add_key(torch.ones(8), gate=r.add_gate(Gate.linear(w, 0.0, -0.2)))
    x = torch.randn(1, 10, 8)
    changed = x.clone()
    changed[0, 6:, 0] = 100.0  # a burst late in the sequence cannot open the gate for earlier tokens
    a, b = r.eligible(r.features(x)), r.eligible(r.features(changed))
    assert torch.equal(a[0, :6], b[0, :6])


def test_experts_without_a_gate_are_always_eligible():
    r = make_router()
    r.add_key(torch.randn(8))
    assert r.eligible(r.features(torch.randn(3, 5, 8))).all()


def test_ema_moves_routed_keys_toward_their_tokens_mean_and_leaves_others():
    r = make_router(n_experts=3, top_k=1, momentum=0.9)
    keys0 = r.keys.clone()
    x = torch.randn(6, 8)
    ids = torch.tensor([[0], [0], [2], [0], [2], [2]])
    r.update_keys(x, ids)
    xn = F.normalize(x, dim=-1)
    for e in (0, 2):
        target = F.normalize(xn[ids[:, 0] == e].mean(0), dim=-1)
        want = F.normalize(0.9 * keys0[e] + 0.1 * target, dim=-1)
        assert torch.allclose(r.keys[e], want, atol=1e-6)
    assert torch.equal(r.keys[1], keys0[1])


def test_repeated_ema_converges_to_the_tokens_direction():
    r = make_router(n_experts=1, top_k=1, momentum=0.5)
    target = F.normalize(torch.randn(8), dim=-1)
    x = target + 0.01 * torch.randn(32, 8)
    for _ in range(40):
        r.update_keys(x, torch.zeros(32, 1, dtype=torch.long))
    assert float(r.keys[0] @ target) > 0.999


def test_learned_router_weights_renormalise_over_topk_and_gate_learns():
    r = LearnedRouter(8, 4, top_k=2)
    x = torch.randn(10, 8)
    out = r(x)
    assert torch.allclose(out.weights.sum(-1), torch.ones(10))
    assert torch.equal(out.expert_ids, out.belief.topk(2).indices)
    out.weights[:, 0].sum().backward()
    assert r.gate.weight.grad is not None


def test_top_any_weights_every_expert_by_the_softmax():
    r = LearnedRouter(8, 4, top_k=1, top_any=True)
    out = r(torch.randn(10, 8))
    probs, order = out.belief.sort(-1, descending=True)
    assert torch.equal(out.expert_ids, order)  # all four experts, best first, none skipped
    assert torch.allclose(out.weights, probs)


def test_top_any_floor_skips_experts_below_it_but_keeps_the_best():
    r = LearnedRouter(8, 4, top_k=1, top_any=True, floor=0.2)
    with torch.no_grad():
        r.gate.weight.copy_(torch.randn(4, 8) * 3)  # sharp routing: many slots under the floor
    out = r(torch.randn(200, 8))
    probs = out.belief.sort(-1, descending=True).values
    run = out.expert_ids != SKIPPED
    assert torch.equal(run[:, 1:], probs[:, 1:] >= 0.2) and run[:, 0].all()
    assert (out.weights[~run] == 0).all() and torch.allclose(out.weights.sum(-1), torch.ones(200))
    kept = probs * run
    assert torch.allclose(out.weights, kept / kept.sum(-1, keepdim=True))
    assert 1 <= run.sum(-1).float().mean() < 4  # fewer experts than Top-Any without a floor


@pytest.mark.parametrize("k", [1, 3])
def test_topk_count(k):
    assert make_router(top_k=k)(torch.randn(5, 8)).expert_ids.shape == (5, k)


def test_centered_routing_subtracts_the_running_mean():
    r = make_router(centered=True, momentum=0.5)
    offset = torch.full((8,), 10.0)
    x = torch.randn(64, 8) + offset
    raw = make_router(momentum=0.5)
    raw.keys.copy_(r.keys)
    # Before any update the centre is zero: centred routing equals raw routing.
    assert torch.equal(r(x).expert_ids, raw(x).expert_ids)
    for _ in range(30):
        r.update_keys(x, r(x).expert_ids)
        r.update_center(x)
    assert torch.allclose(r.center, x.mean(0), atol=1e-3)
    want = F.normalize(x - r.center, dim=-1) @ F.normalize(r.keys, dim=-1).T
    assert torch.allclose(r.similarity(x), want, atol=1e-6)
    # The shared offset dominates raw cosine (every token looks alike); centring removes it.
    assert raw(x).max_sim.std() < r(x).max_sim.std()


def test_stacked_gates_of_different_widths_open_as_each_does_alone():
    torch.manual_seed(0)
    r = make_router(n_experts=2, top_k=1)
    narrow = Gate(torch.randn(8), torch.randn(3, 8), torch.randn(3), torch.randn(3), torch.tensor(0.1), torch.tensor(0.2))
    wide = Gate(torch.zeros(8), torch.randn(5, 8), torch.randn(5), torch.randn(5), torch.tensor(-0.3), torch.tensor(0.0))
    f = r.features(torch.randn(3, 10, 8))
    alone = gate_open(f, narrow)
    assert r.add_gate(narrow) == 0 and r.add_gate(wide) == 1 and r.gate_u.shape == (2, 5, 8)
    for g in (1, 0, None):
        r.add_key(torch.randn(8), gate=g)
    eligible = r.eligible(f)
    assert torch.equal(eligible[..., 3], alone)  # zero-padded to the wider gate, it opens where it did
    assert torch.equal(eligible[..., 2], gate_open(f, wide))
    assert eligible[..., [0, 1, 4]].all()
    # The score is the documented formula.
    h = F.gelu(f @ narrow.u.T + narrow.c) @ narrow.v
    want = causal_mean(f @ narrow.w + h - narrow.shift, GATE_PRIOR_TOKENS) + narrow.b > 0
    assert torch.equal(alone, want)
