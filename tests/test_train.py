import dataclasses

import pytest
import torch

from hst.config import ConfigError, HSTError, TrainConfig
from hst.data import DataError
from hst.evaluation import evaluate
from hst.model import GPT
from hst.train import TrainingError, autocast_dtype, lr_at, resolve_device, sample_batch, train


def test_lr_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(domains=("a",), steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_batches_are_seeded_windows_of_the_streams():
    streams = [torch.arange(100, dtype=torch.uint8), torch.arange(100, 200, dtype=torch.uint8)]
    x1, y1, d1 = sample_batch(streams, 8, 10, torch.Generator().manual_seed(3))
    x2, _, _ = sample_batch(streams, 8, 10, torch.Generator().manual_seed(3))
    assert torch.equal(x1, x2) and x1.shape == (8, 10)
    assert torch.equal(x1[:, 1:], y1[:, :-1]) and torch.all(y1[:, -1] == x1[:, -1] + 1)
    assert torch.equal(d1, (x1[:, 0] >= 100).long())  # each row's label is the stream it came from
    assert 0 < int(d1.sum()) < 8


def test_explicit_precisions():
    cpu = torch.device("cpu")
    assert autocast_dtype("fp32", cpu) is None
    assert autocast_dtype("bf16", cpu) is torch.bfloat16


def tiny_run(cfg, seed, **kw):
    text = torch.tensor(list(b"the quick brown fox jumps over the lazy dog. " * 60), dtype=torch.uint8)
    tcfg = TrainConfig(domains=("a",), steps=12, batch_size=4, lr=3e-3, warmup_steps=2, eval_every=6,
                       eval_windows=4, precision="fp32", seed=seed, **kw)
    torch.manual_seed(seed)
    model = GPT(cfg)
    curves = train(model, tcfg, {"a": text}, {"a": text[:400]})
    return model, curves


def test_training_is_deterministic_and_lowers_validation_bpb(tiny_cfg):
    m1, c1 = tiny_run(tiny_cfg, 0)
    _, c2 = tiny_run(tiny_cfg, 0)
    assert c1["train"] == c2["train"] and c1["val"] == c2["val"]
    assert [r["step"] for r in c1["val"]] == [6, 12]
    text = torch.tensor(list(b"the quick brown fox jumps over the lazy dog. " * 10), dtype=torch.uint8)
    assert evaluate(m1, text, 4).bpb < evaluate(GPT(tiny_cfg), text, 4).bpb - 1.0


def test_training_moves_keys_only_when_enabled(tiny_cfg):
    torch.manual_seed(0)
    init = [b.ffn.router.keys.clone() for b in GPT(tiny_cfg).blocks]
    moved, _ = tiny_run(tiny_cfg, 0)
    frozen, _ = tiny_run(tiny_cfg, 0, update_keys=False)
    assert all(torch.equal(k, b.ffn.router.keys) for k, b in zip(init, frozen.blocks))
    assert not all(torch.equal(k, b.ffn.router.keys) for k, b in zip(init, moved.blocks))


def test_frozen_parameters_stay_bit_identical(tiny_cfg):
    text = torch.tensor(list(b"abcdefgh" * 100), dtype=torch.uint8)
    torch.manual_seed(0)
    model = GPT(tiny_cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.blocks[1].ffn.experts[2].parameters():
        p.requires_grad_(True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tcfg = TrainConfig(domains=("a",), steps=5, batch_size=4, warmup_steps=1, eval_every=5, eval_windows=2,
                       precision="fp32", update_keys=False)
    train(model, tcfg, {"a": text}, {"a": text})
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"blocks.1.ffn.experts.2.up.weight", "blocks.1.ffn.experts.2.down.weight"}


def test_device_auto_picks_cuda_only_when_present_and_a_bad_device_is_one_line():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(HSTError, match="device: cuda requested but no CUDA device is available"):
            resolve_device("cuda")
    with pytest.raises(ConfigError, match="device: expected auto, cpu or cuda, got 'tpu'"):
        TrainConfig(device="tpu")


def test_evaluate_returns_routing_per_layer(tiny_cfg):
    text = torch.randint(0, 256, (500,), dtype=torch.uint8)
    ev = evaluate(GPT(tiny_cfg), text, 3)
    assert 7.5 < ev.bpb < 8.5
    assert [t.shape for t in ev.expert_ids] == [(96, 2), (96, 2)]
    dense = evaluate(GPT(dataclasses.replace(tiny_cfg, ffn="dense")), text, 3)
    assert dense.expert_ids == [None, None]


def test_a_domain_shorter_than_one_window_is_a_clear_error(tiny_cfg):
    tcfg = TrainConfig(domains=("a",), steps=2, warmup_steps=1, precision="fp32")
    with pytest.raises(DataError, match="domain 'b': 10 tokens, too few"):
        train(GPT(tiny_cfg), tcfg, {"a": torch.zeros(500, dtype=torch.uint8)},
              {"b": torch.zeros(10, dtype=torch.uint8)})


def test_validation_passes_log_routing_metrics_and_warn_on_collapse(tiny_cfg):
    text = torch.tensor(list(b"the quick brown fox jumps over the lazy dog. " * 60), dtype=torch.uint8)
    code = torch.tensor(list(b"def f(x):\n    return [x * i for i in range(9)]\n" * 60), dtype=torch.uint8)
    tcfg = TrainConfig(domains=("en", "py"), steps=4, batch_size=4, warmup_steps=1, eval_every=2, eval_windows=4,
                       precision="fp32", min_itjd=1.0)  # a distance of 1 is never reached here: always warns
    with pytest.warns(RuntimeWarning, match="ITJD below 1.0"):
        curves = train(GPT(tiny_cfg), tcfg, {"en": text, "py": code}, {"en": text[:400], "py": code[:400]})
    row = curves["val"][-1]
    for layer in range(tiny_cfg.n_layer):
        assert 0 <= row[f"itjd.layer{layer}"] <= 1 and 0 <= row[f"rmi.layer{layer}"] <= 1
        assert 1 <= row[f"eff_k.layer{layer}"] <= tiny_cfg.n_experts
    dense = train(GPT(dataclasses.replace(tiny_cfg, ffn="dense")), dataclasses.replace(tcfg, min_itjd=0.0),
                  {"en": text, "py": code}, {"en": text[:400]})
    assert set(dense["val"][-1]) == {"step", "en"}


def test_a_diverging_run_stops_at_the_first_non_finite_loss_naming_the_step(tiny_cfg):
    model = GPT(tiny_cfg)
    stream = torch.randint(0, 256, (4000,), dtype=torch.uint8)
    cfg = TrainConfig(domains=("a",), steps=20, batch_size=2, lr=1e30, warmup_steps=0, grad_clip=0.0, precision="fp32")
    with pytest.raises(TrainingError, match=r"train: step \d+: loss is nan .*lower the learning rate, now [0-9.e+]+"):
        train(model, cfg, {"a": stream}, {})
