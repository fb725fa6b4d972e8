import dataclasses

import pytest
import torch

from hst import checkpoint, sketches
from hst.checkpoint import CheckpointError
from hst.model import GPT
from hst.router import Gate


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


def gated(model: GPT) -> GPT:
    """Two gates of different widths at layer 0, one linear gate at layer 1, experts behind them."""
    torch.manual_seed(0)
    for layer, widths in [(0, [2, 6]), (1, [0])]:
        router = model.moe(layer).router
        for h in widths:
            g = router.add_gate(Gate(torch.randn(32), torch.randn(h, 32), torch.randn(h), torch.randn(h),
                                     torch.tensor(0.0), torch.tensor(0.5)))
            model.add_expert(layer, torch.randn(32), gate=g)
    return model


def test_round_trip_with_gates_of_any_width(tiny_cfg, tmp_path):
    model = gated(GPT(tiny_cfg))
    checkpoint.save(tmp_path / "m.pt", model)
    loaded, _ = checkpoint.load(tmp_path / "m.pt", expect=tiny_cfg)
    assert loaded.moe(0).router.gate_u.shape == (2, 6, 32) and loaded.moe(1).router.gate_u.shape == (1, 0, 32)
    idx = torch.randint(0, 256, (2, 32))
    model.eval(), loaded.eval()
    assert torch.equal(model(idx).logits, loaded(idx).logits)


def test_a_format_2_checkpoint_loads_and_routes_as_before(tiny_cfg, tmp_path):
    """Format 2 stored one linear gate per expert (ungated: w 0, shift 0, b 1)."""
    model = GPT(tiny_cfg)
    for layer in (0, 1):
        router = model.moe(layer).router
        g = router.add_gate(Gate.linear(torch.randn(32), 0.1, 0.5))
        for _ in range(2):
            model.add_expert(layer, torch.randn(32), gate=g)
    state = model.state_dict()
    for layer in (0, 1):
        p = f"blocks.{layer}.ffn.router."
        per_expert, _ = state.pop(p + "expert_gate"), state.pop(p + "expert_path")
        gated_rows = per_expert >= 0
        w = torch.zeros(len(per_expert), 32)
        w[gated_rows] = state[p + "gate_w"][per_expert[gated_rows]]
        shift, b = torch.zeros(len(per_expert)), torch.ones(len(per_expert))
        shift[gated_rows], b[gated_rows] = state[p + "gate_shift"][0], state[p + "gate_b"][0]
        for name in ("u", "c", "v"):
            del state[p + "gate_" + name]
        state |= {p + "gate_w": w, p + "gate_shift": shift, p + "gate_b": b}
    torch.save({"format_version": 2, "config": dataclasses.asdict(tiny_cfg), "n_experts": model.n_experts,
                "state_dict": state, "meta": {}}, tmp_path / "v2.pt")
    loaded, _ = checkpoint.load(tmp_path / "v2.pt")
    assert loaded.moe(0).router.expert_gate.tolist() == [-1, -1, -1, -1, 0, 0]
    idx = torch.randint(0, 256, (2, 32))
    model.eval(), loaded.eval()
    assert torch.equal(model(idx).logits, loaded(idx).logits)


def _as_format_4(state: dict) -> dict:
    """The same model as format 4 stored it: a path's experts behind a placeholder gate of that path."""
    old = {**state, "format_version": 4, "state_dict": dict(state["state_dict"])}
    sd = old["state_dict"]
    for key in [k for k in sd if k.endswith("expert_path")]:
        prefix = key[:-len("expert_path")]
        expert_path, gate_path = sd.pop(key), [-1] * len(sd[prefix + "gate_b"])
        for p in sorted(set(expert_path[expert_path > 0].tolist())):
            sd[prefix + "expert_gate"] = torch.where(expert_path == p, len(gate_path), sd[prefix + "expert_gate"])
            gate_path.append(p)
            for name in Gate._fields:
                stored = sd[prefix + f"gate_{name}"]  # the placeholder: zero weights, no hidden units
                sd[prefix + f"gate_{name}"] = torch.cat([stored, torch.zeros(1, *stored.shape[1:])])
        sd[prefix + "gate_path"] = torch.tensor(gate_path, dtype=torch.long)
    return old


def test_paths_round_trip_format_3_loads_converted_and_format_4_paths_are_refused(tiny_cfg, tmp_path):
    model = GPT(tiny_cfg)
    gated = Gate(0.1 * torch.randn(32), torch.randn(4, 32), torch.zeros(4), torch.randn(4), torch.tensor(0.0),
                 torch.tensor(0.0))
    model.moe(0).add_expert(torch.randn(32), gate=model.moe(0).router.add_gate(gated))
    model.moe(1).add_expert(model.moe(1).router.keys[0], path=1)
    checkpoint.save(tmp_path / "unsketched.pt", model)
    with pytest.raises(CheckpointError, match="2 paths but 0 path sketches"):
        checkpoint.load(tmp_path / "unsketched.pt")
    for p in range(2):
        model.add_path_sketch(sketches.fit_sketch(torch.randint(0, 256, (500,))))
    model.inference = "select"
    model.path_heads.add(2, model.lm_head.weight)
    checkpoint.save(tmp_path / "m.pt", model)
    with pytest.raises(CheckpointError, match=r"m.pt: output heads of paths \[2\] do not fit 2 paths"):
        checkpoint.load(tmp_path / "m.pt")
    del model.path_heads["2"]
    model.path_heads.add(0, model.lm_head.weight)  # path 0 reads lm_head: a head of its own would never be read
    checkpoint.save(tmp_path / "m.pt", model)
    with pytest.raises(CheckpointError, match=r"m.pt: output heads of paths \[0\] do not fit 2 paths"):
        checkpoint.load(tmp_path / "m.pt")
    del model.path_heads["0"]
    model.path_heads.add(1, torch.randn_like(model.lm_head.weight))
    checkpoint.save(tmp_path / "m.pt", model)
    loaded, _ = checkpoint.load(tmp_path / "m.pt")
    assert loaded.n_paths == 2 and loaded.moe(1).router.expert_path.tolist() == [0, 0, 0, 0, 1]
    assert torch.equal(loaded.path_heads["1"], model.path_heads["1"])
    assert loaded.inference == "select" and torch.equal(loaded.path_sketches, model.path_sketches)
    idx = torch.randint(0, 256, (2, 32))  # segments of 8 and 24 tokens: path 0, then the chosen one
    model.eval(), loaded.eval()
    assert torch.equal(model(idx).logits, loaded(idx).logits)
    # Format 4's paths were chosen by byte-trigram sketches, which format 6 replaced: refused in one line.
    v4 = _as_format_4(torch.load(tmp_path / "m.pt", weights_only=True))
    assert v4["state_dict"]["blocks.1.ffn.router.gate_path"].tolist() == [1]
    torch.save(v4, tmp_path / "v4.pt")
    with pytest.raises(CheckpointError, match="byte-trigram tables"):
        checkpoint.load(tmp_path / "v4.pt")
    # Format 3 had no gate_path: every gate it stored is a learned one.
    del v4["state_dict"]["blocks.0.ffn.router.gate_path"], v4["state_dict"]["blocks.1.ffn.router.gate_path"]
    for name in ("path_sketches", "path_select", "path_heads.1"):
        del v4["state_dict"][name]
    torch.save({**v4, "format_version": 3}, tmp_path / "v3.pt")
    old, _ = checkpoint.load(tmp_path / "v3.pt")
    assert old.n_paths == 1 and len(old.moe(1).router.gate_b) == 1
    old.eval()
    # the zero path gate, read as a learned gate with bias 0, never opens
    assert torch.equal(old(idx).logits, model(idx, path=0).logits)


def test_round_trip_of_a_dense_model(tiny_cfg, tmp_path):
    """A dense FFN is stored as one expert per layer, fewer than top_k (the dense baselines' checkpoints)."""
    cfg = dataclasses.replace(tiny_cfg, ffn="dense")
    model = GPT(cfg)
    checkpoint.save(tmp_path / "m.pt", model, {})
    loaded, _ = checkpoint.load(tmp_path / "m.pt", expect=cfg)
    idx = torch.randint(0, 256, (2, 32))
    model.eval(), loaded.eval()
    assert loaded.n_experts == [1] * cfg.n_layer and torch.equal(model(idx).logits, loaded(idx).logits)


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


def test_non_finite_weights_are_never_written_or_loaded(tiny_cfg, tmp_path):
    model = GPT(tiny_cfg)
    checkpoint.save(tmp_path / "ok.pt", model)
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("inf")
    with pytest.raises(CheckpointError, match="ok.pt: refusing to write non-finite weights \\(lm_head.weight\\)"):
        checkpoint.save(tmp_path / "ok.pt", model)
    checkpoint.load(tmp_path / "ok.pt")  # the previous version is intact
    state = torch.load(tmp_path / "ok.pt", weights_only=True)
    state["state_dict"]["blocks.0.attn.qkv.weight"] = state["state_dict"]["blocks.0.attn.qkv.weight"] * float("nan")
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match="nan.pt: non-finite weights \\(blocks.0.attn.qkv.weight\\)"):
        checkpoint.load(tmp_path / "nan.pt")


def test_structure_that_does_not_fit_the_config_is_named(tiny_cfg, tmp_path):
    checkpoint.save(tmp_path / "m.pt", GPT(tiny_cfg))
    state = torch.load(tmp_path / "m.pt", weights_only=True)
    for change, message in [(lambda s: s.update(n_experts=[4]), r"expert counts \[4\] do not fit"),
                            (lambda s: s.update(n_experts=[4, 1]), r"expert counts \[4, 1\] do not fit"),
                            (lambda s: s.pop("state_dict"), r"lacks \['state_dict'\]"),
                            (lambda s: s["state_dict"].pop("lm_head.weight"), "weights do not match the stored config")]:
        bad = {**state, "state_dict": dict(state["state_dict"]), "n_experts": list(state["n_experts"])}
        change(bad)
        torch.save(bad, tmp_path / "bad.pt")
        with pytest.raises(CheckpointError, match=message):
            checkpoint.load(tmp_path / "bad.pt")


@pytest.mark.parametrize("version, edit, message", [
    (6, lambda sd: sd.__setitem__("blocks.1.ffn.router.gate_b", torch.zeros(1)), "disagree on the number of gates"),
    (6, lambda sd: sd["blocks.1.ffn.router.expert_path"].__setitem__(-1, -1), "expert_path must give each"),
    (6, lambda sd: sd["blocks.1.ffn.router.expert_path"].__setitem__(-1, 2), r"paths \[2\] are not numbered"),
    (6, lambda sd: sd.__setitem__("blocks.1.ffn.router.expert_path", torch.zeros(5)),
     "blocks.1.ffn.router.expert_path must hold integers"),
    (6, lambda sd: sd.__setitem__("blocks.1.ffn.router.expert_path", torch.zeros(4, dtype=torch.long)),
     "weights do not match the stored config"),
    (6, lambda sd: sd["blocks.1.ffn.router.expert_gate"].__setitem__(-1, 3), "expert_gate must give each"),
    # A format-4 file with paths is refused, a float path number first.
    (4, lambda sd: sd.__setitem__("blocks.1.ffn.router.gate_path", torch.tensor([1.0])), "gate_path must hold integers"),
    (4, lambda sd: sd.pop("path_sketches"), "byte-trigram tables"),
])
def test_a_checkpoint_whose_growth_gates_or_paths_were_edited_is_refused_in_one_line(tiny_cfg, tmp_path, version,
                                                                                      edit, message):
    model = GPT(tiny_cfg)
    model.moe(1).add_expert(model.moe(1).router.keys[0], path=1)
    for _ in range(2):
        model.add_path_sketch(sketches.fit_sketch(torch.randint(0, 256, (100,))))
    checkpoint.save(tmp_path / "m.pt", model)
    checkpoint.load(tmp_path / "m.pt")
    state = torch.load(tmp_path / "m.pt", weights_only=True)
    state = _as_format_4(state) if version == 4 else state
    edit(state["state_dict"])
    torch.save(state, tmp_path / "edited.pt")
    with pytest.raises(CheckpointError, match=message):
        checkpoint.load(tmp_path / "edited.pt")


def test_a_full_disk_is_one_line_and_the_old_checkpoint_survives(tmp_path, tiny_cfg, monkeypatch):
    checkpoint.save(tmp_path / "m.pt", GPT(tiny_cfg))
    before = (tmp_path / "m.pt").read_bytes()

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:595] . PytorchStreamWriter failed writing file "
                           "data/3: file write failed")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.save(tmp_path / "m.pt", GPT(tiny_cfg))
    assert "file write failed" in str(e.value) and "is it full?" in str(e.value) and "\n" not in str(e.value)
    assert (tmp_path / "m.pt").read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["m.pt"]
