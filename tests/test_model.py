import dataclasses
import math

import pytest
import torch

from hst.model import GPT
from hst.paths import mix_paths
from hst.router import Gate


@pytest.mark.parametrize("ffn", ["key", "learned", "dense"])
def test_forward_shapes_and_routing(tiny_cfg, ffn):
    cfg = dataclasses.replace(tiny_cfg, ffn=ffn)
    model = GPT(cfg)
    idx = torch.randint(0, 256, (3, 20))
    out = model(idx, idx)
    assert out.logits.shape == (3, 20, 256) and out.loss.ndim == 0
    assert len(out.routing) == cfg.n_layer
    for r in out.routing:
        if ffn == "dense":
            assert r is None
        else:
            assert r.expert_ids.shape == (60, 2) and r.weights.shape == (60, 2)
            assert r.max_sim.shape == (60,)
            assert r.belief.shape == (60, 4)


def test_untrained_model_predicts_about_uniform(tiny_cfg):
    idx = torch.randint(0, 256, (4, 32))
    with torch.no_grad():
        loss = GPT(tiny_cfg)(idx, idx).loss
    assert abs(float(loss) - torch.log(torch.tensor(256.0))) < 0.1


def test_causal_future_tokens_do_not_change_the_past(tiny_cfg):
    model = GPT(tiny_cfg).eval()
    a = torch.randint(0, 256, (1, 16))
    b = a.clone()
    b[0, 10:] = torch.randint(0, 256, (6,))
    la, lb = model(a).logits, model(b).logits
    assert torch.allclose(la[:, :10], lb[:, :10], atol=1e-6)
    assert not torch.allclose(la[:, 10:], lb[:, 10:])


def test_too_long_input_is_refused(tiny_cfg):
    with pytest.raises(ValueError, match="seq_len"):
        GPT(tiny_cfg)(torch.zeros(1, 33, dtype=torch.long))


def test_dense_ffn_has_the_same_active_width(tiny_cfg):
    dense = GPT(dataclasses.replace(tiny_cfg, ffn="dense"))
    assert dense.blocks[0].ffn.up.out_features == tiny_cfg.top_k * tiny_cfg.expert_hidden
    assert dense.n_experts == [1, 1]


def test_add_expert_grows_one_layer(tiny_cfg):
    model = GPT(tiny_cfg)
    assert model.add_expert(1, torch.randn(32)) == 4
    assert model.n_experts == [4, 5]
    with pytest.raises(ValueError, match="dense"):
        GPT(dataclasses.replace(tiny_cfg, ffn="dense")).add_expert(0, torch.randn(32))


def test_a_few_steps_learn_a_repetitive_text(tiny_cfg):
    model = GPT(tiny_cfg)
    seq = torch.tensor(list(b"abcabcabcabcabcabcabcabcabcabcabcab"))[None]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        loss = model(seq[:, :-1][:, :32], seq[:, 1:][:, :32], update_keys=True).loss
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.3 * first


def test_flops_per_token_count_the_active_matmuls(tiny_cfg):
    d, V, T, h = tiny_cfg.d_model, tiny_cfg.vocab_size, tiny_cfg.seq_len, tiny_cfg.expert_hidden
    attn = 2 * 4 * d * d + 2 * d * T
    dense = GPT(dataclasses.replace(tiny_cfg, ffn="dense"))
    assert dense.flops_per_token() == 2 * d * V + tiny_cfg.n_layer * (attn + 4 * d * 2 * h)
    key = GPT(tiny_cfg)  # top-2 of 4 experts: the dense FFN's FLOPs plus the router's
    assert key.flops_per_token() == dense.flops_per_token() + tiny_cfg.n_layer * 2 * d * 4
    any_cfg = dataclasses.replace(tiny_cfg, ffn="learned", routing="top_any")
    assert GPT(any_cfg).flops_per_token() == key.flops_per_token() + tiny_cfg.n_layer * 2 * 4 * d * h
    assert GPT(any_cfg).flops_per_token([1.0, 1.0]) == key.flops_per_token() - tiny_cfg.n_layer * 4 * d * h
    gated = GPT(tiny_cfg)  # a growth gate of 8 hidden units scores every token: (1 + 8) multiply-adds per feature
    gated.moe(0).router.add_gate(Gate(torch.zeros(d), torch.zeros(8, d), torch.zeros(8), torch.zeros(8),
                                      torch.tensor(0.0), torch.tensor(0.0)))
    assert gated.flops_per_token() == key.flops_per_token() + 2 * d * 9
    paths = GPT(tiny_cfg)  # a path's experts add only their keys' scores to one path; the mixture runs every path
    for path in (1, 2):
        paths.add_expert(0, torch.randn(d), path=path)
    assert paths.flops_per_token() == key.flops_per_token() + 2 * d * 2
    assert paths.flops_per_token(all_paths=True) == 3 * paths.flops_per_token()


def test_path_mixture_loses_at_most_log_paths_to_its_best_path_on_every_sequence():
    torch.manual_seed(0)
    P, B, T, V = 3, 4, 20, 7
    logits, idx = 3 * torch.randn(P, B, T, V), torch.randint(0, V, (B, T))
    logp, weights = mix_paths(logits, idx)
    assert torch.allclose(logp.exp().sum(-1), torch.ones(B, T), atol=1e-5)
    assert torch.allclose(weights[:, :, 0], torch.full((P, B), 1 / P))  # no context yet: the uniform prior
    nll = lambda lp: -lp[:, :-1].gather(-1, idx[:, 1:, None])[..., 0].sum(-1)  # noqa: E731  (B,) per sequence
    paths = torch.stack([nll(lg.log_softmax(-1)) for lg in logits])  # (P, B)
    assert (nll(logp) <= paths.min(0).values + math.log(P) + 1e-4).all()
    assert (nll(logp) > paths.min(0).values).any()  # the bound is not vacuous: the mixture pays for not knowing
    # The weights use only the bytes seen so far: changing the last input byte changes no weight before it.
    other = idx.clone()
    other[:, -1] = (other[:, -1] + 1) % V
    moved = mix_paths(logits, other)[1]
    assert torch.equal(moved[..., :-1], weights[..., :-1]) and not torch.equal(moved[..., -1], weights[..., -1])


def test_paths_leave_the_base_model_and_earlier_paths_bit_identical(tiny_cfg):
    model = GPT(tiny_cfg)
    idx = torch.randint(0, 256, (2, 16))
    base = model(idx).logits
    model.moe(0).add_expert(model.moe(0).router.keys[0] + 0.01, path=1)  # wins its key's tokens on path 1
    with torch.no_grad():
        model.moe(0).experts[-1].down.weight.mul_(3)
    assert model.n_paths == 2
    assert torch.equal(model(idx, path=0).logits, base)
    one = model(idx, path=1).logits
    assert not torch.equal(one, base)
    mixed = model(idx)
    assert torch.equal(mixed.logits, mix_paths(torch.stack([base, one]), idx)[0])
    model.moe(0).add_expert(model.moe(0).router.keys[1] + 0.01, path=2)
    assert torch.equal(model(idx, path=1).logits, one)
    with pytest.raises(ValueError, match="update_keys"):
        model(idx, update_keys=True)
