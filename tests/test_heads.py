import pytest
import torch

from hst.model import GPT


def model_of_three_paths(tiny_cfg) -> GPT:
    model = GPT(tiny_cfg)
    for path in (1, 2):
        for layer in range(tiny_cfg.n_layer):
            model.add_expert(layer, model.moe(layer).router.keys[path], path=path)
    return model.eval()


@torch.no_grad()
def test_a_new_head_starts_as_path_0s_and_a_path_without_one_reads_path_0s(tiny_cfg):
    model = model_of_three_paths(tiny_cfg)
    h0 = model.trunk(torch.randint(0, 256, (2, 16)))
    before = [model.from_trunk(h0, False, p)[0] for p in range(3)]
    head = model.path_heads.add(1, model.lm_head.weight)
    assert list(model.state_dict()).count("path_heads.1") == 1
    assert all(torch.equal(model.from_trunk(h0, False, p)[0], before[p]) for p in range(3))
    head.add_(0.1)  # the copy is its own: training it leaves path 0's head and path 2 (which reads it) as they were
    assert not model.lm_head.weight.eq(head).all()
    assert not torch.equal(model.from_trunk(h0, False, 1)[0], before[1])
    assert torch.equal(model.from_trunk(h0, False, 0)[0], before[0])
    assert torch.equal(model.from_trunk(h0, False, 2)[0], before[2])
    with pytest.raises(ValueError, match="path 1 already has a head"):
        model.path_heads.add(1, model.lm_head.weight)


@torch.no_grad()
def test_rows_on_different_heads_get_what_each_path_computes_alone(tiny_cfg):
    model = model_of_three_paths(tiny_cfg)
    model.path_heads.add(2, torch.randn_like(model.lm_head.weight))
    idx = torch.randint(0, 256, (4, 16))
    path = torch.tensor([2, 0, 1, 2])
    logits, _ = model.from_trunk(model.trunk(idx), False, path)
    for row, p in enumerate(path.tolist()):
        alone, _ = model.from_trunk(model.trunk(idx[row:row + 1]), False, p)
        torch.testing.assert_close(logits[row], alone[0], rtol=0, atol=1e-5)
