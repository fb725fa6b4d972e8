import dataclasses

import pytest
import torch

from hst import checkpoint
from hst.checkpoint import CheckpointError
from hst.model import GPT


def test_round_trip_with_grown_experts(tiny_cfg, tmp_path):
    model = GPT(tiny_cfg)
    model.add_expert(0, torch.randn(32), init="random")
    model.add_expert(0, torch.randn(32))
    model.add_expert(1, torch.randn(32))
    path = tmp_path / "m.pt"
    checkpoint.save(path, model, {"stage": "test", "val_bpb": {"a": 1.5}})
    raw = torch.load(path, weights_only=True)
    assert raw["n_experts"] == [6, 5] and raw["config"]["d_model"] == 32
    loaded, meta = checkpoint.load(path, expect=tiny_cfg)
    assert loaded.n_experts == [6, 5] and meta == {"stage": "test", "val_bpb": {"a": 1.5}}
    idx = torch.randint(0, 256, (2, 32))
    model.eval(), loaded.eval()
    assert torch.equal(model(idx).logits, loaded(idx).logits)
    for a, b in zip(model.blocks, loaded.blocks):
        assert torch.equal(a.ffn.router.keys, b.ffn.router.keys)


def test_config_mismatch_names_the_field(tiny_cfg, tmp_path):
    path = tmp_path / "m.pt"
    checkpoint.save(path, GPT(tiny_cfg))
    with pytest.raises(CheckpointError, match="d_model"):
        checkpoint.load(path, expect=dataclasses.replace(tiny_cfg, d_model=64))


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        checkpoint.load(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        checkpoint.load(bad)


def test_failed_save_leaves_the_previous_checkpoint(tiny_cfg, tmp_path):
    path = tmp_path / "m.pt"
    checkpoint.save(path, GPT(tiny_cfg), {"v": 1})
    before = path.read_bytes()
    with pytest.raises(Exception):
        checkpoint.save(path, GPT(tiny_cfg), {"v": lambda: 0})  # not picklable
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]
