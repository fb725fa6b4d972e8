import dataclasses

import torch

from hst.config import TrainConfig
from hst.fars import expert_costs, fars_loss
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
