import dataclasses

import torch

from hst import grow
from hst.config import GrowConfig, TrainConfig
from hst.model import GPT

TEXT = torch.tensor(list("Über allen Gipfeln ist Ruh, in allen Wipfeln spürest du ".encode() * 30), dtype=torch.uint8)


def test_batch_novelty_is_token_weighted():
    assert grow.batch_novelty([1.0, 0.0, 0.5], [10, 30, 20], 2) == [0.25, 0.5]


def test_trigger_needs_m_consecutive_batches_above_p():
    assert grow.triggered([0.6, 0.7, 0.8], 0.5, 3)
    assert not grow.triggered([0.6, 0.4, 0.8, 0.9], 0.5, 3)
    assert grow.triggered([0.6, 0.4, 0.8, 0.9, 0.7], 0.5, 3)


def test_forced_growth_adds_experts_and_trains_only_them(tiny_cfg):
    # A threshold above every similarity marks every token novel: growth is forced.
    model = GPT(dataclasses.replace(tiny_cfg, novelty_threshold=1.0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = GrowConfig(steps=5)
    tcfg = TrainConfig(batch_size=4, warmup_steps=1, eval_every=5, eval_windows=2, precision="fp32")
    added, curves = grow.grow(model, [0, 1], TEXT, cfg, tcfg, n_windows=4)
    assert added == [(0, 4), (1, 4)] and model.n_experts == [5, 5]
    after = model.state_dict()
    for k, v in before.items():
        if "router.keys" in k:
            assert torch.equal(after[k][:4], v)  # old keys untouched, one key appended
        else:
            assert torch.equal(after[k], v), k
    assert not torch.equal(after["blocks.0.ffn.experts.4.up.weight"], before["blocks.0.ffn.experts.0.up.weight"])
    assert len(curves["train"]) == 5


def test_new_key_is_the_mean_of_unrouted_states(tiny_cfg):
    model = GPT(dataclasses.replace(tiny_cfg, novelty_threshold=1.0))
    states = grow.unrouted_states(model, TEXT, 1, 4)
    grow.grow(model, [1], TEXT, GrowConfig(steps=0), TrainConfig(), n_windows=4)
    want = torch.nn.functional.normalize(states.mean(0), dim=-1)
    assert torch.allclose(model.moe(1).router.keys[-1], want, atol=1e-6)
