import torch

from hst.config import TrainConfig
from hst.consolidate import consolidate_expert, consolidate_experts
from hst.evaluation import evaluate, ffn_inputs
from hst.model import GPT
from hst.train import only_trainable

TEXT = torch.tensor(list(b"In the beginning God created the heaven and the earth. " * 40), dtype=torch.uint8)
CFG = TrainConfig(domains=("x",), steps=15, batch_size=4, lr=5e-3, warmup_steps=1, eval_every=15,
                  eval_windows=2, precision="fp32")


def pick_expert(model, layer):
    """The expert the text routes to most at ``layer`` (so the key update has tokens)."""
    ids = model.moe(layer).router(ffn_inputs(model, TEXT, [layer], 4)[0]).expert_ids
    return int(torch.bincount(ids.reshape(-1)).argmax())


def test_consolidation_changes_only_the_selected_expert_and_its_key(tiny_cfg):
    model = GPT(tiny_cfg)
    expert = pick_expert(model, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    bpb0 = evaluate(model, TEXT, 4).bpb
    consolidate_expert(model, 1, expert, TEXT, TEXT, CFG)
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    prefix = f"blocks.1.ffn.experts.{expert}."
    assert changed == {prefix + "up.weight", prefix + "down.weight", "blocks.1.ffn.router.keys"}
    keys0, keys1 = before["blocks.1.ffn.router.keys"], after["blocks.1.ffn.router.keys"]
    moved = [e for e in range(len(keys0)) if not torch.equal(keys0[e], keys1[e])]
    assert moved == [expert]
    assert [p.requires_grad for p in model.parameters()] == flags
    assert evaluate(model, TEXT, 4).bpb < bpb0


def test_only_trainable_freezes_the_rest(tiny_cfg):
    model = GPT(tiny_cfg)
    with only_trainable(model, [(0, 3)]):
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"blocks.0.ffn.experts.3.up.weight", "blocks.0.ffn.experts.3.down.weight"}
    assert all(p.requires_grad for p in model.parameters())


def test_ffn_inputs_of_several_layers_equal_one_layer_at_a_time(tiny_cfg):
    model = GPT(tiny_cfg)
    both = ffn_inputs(model, TEXT, [1, 0], 3)
    assert [x.shape for x in both] == [(3, 32, 32)] * 2 and not torch.equal(both[0], both[1])
    assert all(torch.equal(x, ffn_inputs(model, TEXT, [layer], 3)[0]) for x, layer in zip(both, [1, 0]))


def test_consolidating_several_experts_one_after_another_touches_only_them(tiny_cfg):
    torch.manual_seed(0)
    model = GPT(tiny_cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    curves = consolidate_experts(model, [(0, 1, TEXT, TEXT), (1, 2, TEXT, TEXT)], CFG)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    weights = {k for k in changed if "experts" in k}
    assert weights == {f"blocks.{l}.ffn.experts.{e}.{w}.weight" for l, e in [(0, 1), (1, 2)] for w in ("up", "down")}
    assert changed - weights <= {"blocks.0.ffn.router.keys", "blocks.1.ffn.router.keys"}
    assert [len(c["train"]) for c in curves] == [7, 7]  # the budget split evenly


