import dataclasses

import pytest
import torch

from hst.config import TrainConfig
from hst.fars import consistency_loss, expert_costs, fars_loss
from hst.router import Routing
from hst.model import GPT
from hst.train import make_optimizer, train

TEXT = torch.tensor(list("the quick brown fox jumps over the lazy dog; ".encode() * 60), dtype=torch.uint8)
TCFG = TrainConfig(domains=("t",), steps=3, batch_size=2, warmup_steps=0, eval_every=100, precision="fp32")


def learned(tiny_cfg, n_experts=4):
    return GPT(dataclasses.replace(tiny_cfg, ffn="learned", n_experts=n_experts, top_k=1))


def test_no_optimizer_state_means_no_cost_and_no_loss(tiny_cfg):
    model = learned(tiny_cfg)
    opt = make_optimizer(model, TCFG)
    costs = expert_costs(model, opt)
    assert costs == [None, None]
    out = model(TEXT[:33].long()[None, :-1], TEXT[1:33].long()[None])
    assert float(fars_loss(out.routing, costs, 1.0)) == 0.0


def test_costs_are_per_expert_normalized_norms_of_sqrt_v(tiny_cfg):
    model = learned(tiny_cfg, n_experts=2)
    opt = make_optimizer(model, TCFG)
    for i, expert in enumerate(model.moe(0).experts):
        for p in expert.parameters():
            opt.state[p] = {"exp_avg_sq": torch.full_like(p, (i + 1) ** 2)}  # sqrt(v) = 1 and 2
    cost = expert_costs(model, opt)[0]
    assert torch.allclose(cost, torch.tensor([2 / 3, 4 / 3]))
    assert torch.allclose(expert_costs(model, opt, "mean")[0], torch.tensor([2 / 3, 4 / 3]))


def test_fars_pushes_belief_away_from_the_costlier_expert(tiny_cfg):
    model = learned(tiny_cfg, n_experts=2)
    opt = make_optimizer(model, TCFG)
    for layer in range(tiny_cfg.n_layer):
        for i, expert in enumerate(model.moe(layer).experts):
            for p in expert.parameters():
                opt.state[p] = {"exp_avg_sq": torch.full_like(p, 1.0 if i == 0 else 100.0)}
    gates = [model.moe(layer).router.gate.weight for layer in range(tiny_cfg.n_layer)]
    sgd = torch.optim.SGD(gates, lr=0.5)
    x = TEXT[:64].long().view(2, 32)

    def belief_of_costly():
        with torch.no_grad():
            return float(torch.stack([r.belief[:, 1].mean() for r in model(x).routing]).mean())

    before = belief_of_costly()
    for _ in range(20):
        sgd.zero_grad()
        fars_loss(model(x).routing, expert_costs(model, opt), 1.0).backward()
        sgd.step()
    assert belief_of_costly() < before - 0.05


def test_training_with_fars_matches_plain_training_until_the_optimizer_has_state(tiny_cfg):
    runs = {}
    for lam in (0.0, 1.0):
        torch.manual_seed(0)
        model = learned(tiny_cfg)
        curves = train(model, dataclasses.replace(TCFG, fars_lambda=lam), {"t": TEXT}, {})
        runs[lam] = [r["train_bpb"] for r in curves["train"]]
    assert runs[0.0][0] == runs[1.0][0]  # step 1: no second moment yet, the tax is zero
    assert runs[0.0][1:] != runs[1.0][1:]


def routing_of(belief):
    return Routing(belief.argmax(-1, keepdim=True), torch.ones(len(belief), 1), belief.max(-1).values, belief)


def test_consistency_is_zero_when_every_token_routes_like_its_domain():
    a, b = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.1, 0.1, 0.8])
    domain = torch.tensor([0, 1, 0])  # three sequences of 4 tokens
    belief = torch.stack([a, b, a]).repeat_interleave(4, 0)  # (B·T, E), sequence-major
    assert float(consistency_loss([routing_of(belief), None], domain, 1.0)) == pytest.approx(0.0, abs=1e-7)


def test_consistency_is_the_mean_kl_to_the_domain_mean():
    p, q = torch.tensor([0.9, 0.1]), torch.tensor([0.5, 0.5])
    belief = torch.stack([p, q, q, q])  # one domain, two sequences of two tokens
    m = belief.mean(0)
    kl = lambda u: float((u * (u / m).log()).sum())
    want = 2.0 * (kl(p) + 3 * kl(q)) / 4
    assert float(consistency_loss([routing_of(belief)], torch.tensor([0, 0]), 2.0)) == pytest.approx(want, rel=1e-5)


def test_consistency_pulls_a_domains_tokens_together(tiny_cfg):
    model = learned(tiny_cfg)
    x = TEXT[:128].long().view(4, 32)
    domain = torch.tensor([0, 0, 1, 1])
    sgd = torch.optim.SGD([model.moe(l).router.gate.weight for l in range(tiny_cfg.n_layer)], lr=1.0)
    losses = []
    for _ in range(10):
        sgd.zero_grad()
        loss = consistency_loss(model(x).routing, domain, 1.0)
        losses.append(float(loss.detach()))
        loss.backward()
        sgd.step()
    assert losses[-1] < 0.5 * losses[0]


def test_consistency_changes_training_only_with_several_domains_labelled(tiny_cfg):
    runs = {}
    other = torch.tensor(list("ZYXWVUTSRQPONMLK0123456789".encode() * 80), dtype=torch.uint8)
    for lam in (0.0, 1.0):
        torch.manual_seed(0)
        model = learned(tiny_cfg)
        cfg = dataclasses.replace(TCFG, domains=("t", "o"), consistency_lambda=lam, batch_size=4)
        runs[lam] = [r["train_bpb"] for r in train(model, cfg, {"t": TEXT, "o": other}, {})["train"]]
    assert runs[0.0][0] == runs[1.0][0]  # the reported loss is the main loss
    assert runs[0.0][1:] != runs[1.0][1:]
