import pytest
import torch
import torch.nn.functional as F

from hst import novelty
from hst.router import gate_open


def test_auroc_matches_hand_counts():
    assert novelty.auroc([0.0, 1.0], [2.0, 3.0]) == 1.0
    assert novelty.auroc([2.0, 3.0], [0.0, 1.0]) == 0.0
    # pairs (pos, neg): (1,0) win, (1,2) loss, (2,0) win, (2,2) tie -> (2 + 0.5) / 4
    assert novelty.auroc([0.0, 2.0], [1.0, 2.0]) == 0.625
    with pytest.raises(ValueError):
        novelty.auroc([], [1.0])


def test_threshold_is_the_reference_quantile():
    assert novelty.threshold([float(i) for i in range(101)], 0.99) == pytest.approx(99.0)


def test_batches_and_the_m_consecutive_trigger():
    assert novelty.batch_shares([True, False, True, True, False], 2) == [0.5, 1.0, 0.0]
    assert novelty.first_trigger([0.6, 0.7, 0.8], 0.5, 3) == 2
    assert novelty.first_trigger([0.6, 0.4, 0.8, 0.9], 0.5, 3) is None
    assert novelty.first_trigger([0.6, 0.4, 0.8, 0.9, 0.7], 0.5, 3) == 4


def test_gate_separates_a_shifted_distribution_at_the_requested_false_positive_rate():
    torch.manual_seed(0)
    d, shift = 16, torch.zeros(16)
    shift[3] = 0.6
    held_in = F.normalize(torch.randn(64, 32, d), dim=-1)
    novel = F.normalize(torch.randn(64, 32, d) / 4 ** 0.5 + shift, dim=-1)
    gate = novelty.fit_gate([held_in], novel, fpr=0.02)
    fresh_held_in = F.normalize(torch.randn(64, 32, d), dim=-1)
    fresh_novel = F.normalize(torch.randn(64, 32, d) / 4 ** 0.5 + shift, dim=-1)
    assert gate_open(held_in, gate).float().mean() == pytest.approx(0.02, abs=0.005)
    assert gate_open(fresh_held_in, gate).float().mean() < 0.04
    assert gate_open(fresh_novel, gate).float().mean() > 0.9


def test_surprise_flags_a_novel_distribution_and_not_held_in_records(tiny_cfg):
    import random

    from hst import sampler
    from hst.config import TrainConfig
    from hst.data import encode
    from hst.model import GPT
    from hst.train import train

    rng = random.Random(0)
    words = "the cat sat on a mat and dog ran to park with red ball in sun".split()
    english = [" ".join(rng.choice(words) for _ in range(40)) for _ in range(60)]
    model = GPT(tiny_cfg)
    train(model, TrainConfig(domains=("en",), steps=60, batch_size=8, lr=3e-3, warmup_steps=5, eval_every=1000,
                              precision="fp32"), {"en": encode(english[:20])}, {})
    greek = [" ".join(rng.choice("η γάτα κάθισε στο χαλί και ο σκύλος έτρεξε".split()) for _ in range(30))
             for _ in range(40)]
    score = lambda texts: [r.bpb for r in sampler.route_records(model, texts)]  # noqa: E731
    limit = novelty.threshold(score(english[20:40]), 0.99)  # held-in reference (the index's role)
    held_in, novel = score(english[40:]), score(greek)
    assert novelty.auroc(held_in, novel) == 1.0
    flags_novel, flags_held = [b > limit for b in novel], [b > limit for b in held_in]
    assert novelty.first_trigger(novelty.batch_shares(flags_novel, 8), 0.5, 3) == 2  # detected after 24 records
    assert sum(flags_held) <= 2
    assert novelty.first_trigger(novelty.batch_shares(flags_held, 4), 0.5, 3) is None


def test_gate_holds_the_false_positive_rate_on_every_source_not_only_pooled():
    torch.manual_seed(0)
    d, shift = 16, torch.zeros(16)
    shift[3] = 0.6
    far = F.normalize(torch.randn(64, 32, d) - shift, dim=-1)  # a learned domain far from the new one
    near = F.normalize(torch.randn(64, 32, d) + 0.5 * shift, dim=-1)  # and one close to it
    novel = F.normalize(torch.randn(64, 32, d) / 4 ** 0.5 + shift, dim=-1)
    gate = novelty.fit_gate([far, near], novel, fpr=0.02)
    assert gate_open(near, gate).float().mean() <= 0.021  # quantile in float64, gate in float32
    assert gate_open(far, gate).float().mean() < 0.02
    pooled = novelty.fit_gate([torch.cat([far, near])], novel, fpr=0.02)
    assert gate_open(near, pooled).float().mean() > 0.03  # the pooled quantile lets the near domain through


def test_detect_triggers_after_m_consecutive_novel_batches():
    from hst.config import GrowConfig

    cfg = GrowConfig(batch_records=2, min_batches=2, novel_share=0.5)
    found = novelty.detect([1.0, 1.0, 5.0, 1.0, 5.0, 5.0, 5.0, 5.0, 1.0], limit=3.0, cfg=cfg)
    assert found.novel == [False, False, True, False, True, True, True, True, False]
    assert found.shares == [0.0, 0.5, 1.0, 1.0, 0.0]
    assert found.trigger == 3 and found.records_until_detection == 8
    assert novelty.detect([1.0] * 9, limit=3.0, cfg=cfg).trigger is None


def test_an_mlp_gate_admits_what_no_linear_gate_can_at_the_same_false_positive_rate():
    # Held-in tokens sit at x0 = ±2, novel ones between them at x0 = 0: the class means agree, so no
    # direction separates them, while one hidden layer does.
    torch.manual_seed(0)
    d = 8

    def tokens(centres: torch.Tensor) -> torch.Tensor:  # (128 windows, 32 tokens, d)
        x = 0.3 * torch.randn(128, 32, d)
        x[..., 0] += centres[torch.randint(len(centres), (128, 32))]
        return x

    held_in, novel = tokens(torch.tensor([-2.0, 2.0])), tokens(torch.tensor([0.0]))
    fresh_held_in, fresh_novel = tokens(torch.tensor([-2.0, 2.0])), tokens(torch.tensor([0.0]))
    linear = novelty.fit_gate([held_in], novel, fpr=0.02)
    mlp = novelty.fit_gate([held_in], novel, fpr=0.02, hidden=16)
    assert mlp.u.shape == (16, d) and not linear.u.numel()
    assert gate_open(held_in, mlp).float().mean() <= 0.021
    assert gate_open(fresh_held_in, mlp).float().mean() < 0.05  # a 2 % tail of 128 windows: 1-5 % over seeds
    assert gate_open(fresh_novel, mlp).float().mean() > 0.9
    assert gate_open(fresh_novel, linear).float().mean() < 0.2
    assert torch.equal(novelty.fit_gate([held_in], novel, 0.02, hidden=16).u, mlp.u)  # seeded: same gate again
