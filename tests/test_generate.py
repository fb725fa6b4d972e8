import pytest

from hst import data, generate
from hst.config import TrainConfig
from hst.model import GPT
from hst.train import train


def test_samples_are_seeded_and_have_the_asked_shape(tiny_cfg):
    model = GPT(tiny_cfg)
    a = generate.sample_records(model, 5, 40, seed=3, batch_size=2)
    assert len(a) == 5 and all(len(t.encode()) <= 40 for t in a)
    assert generate.sample_records(model, 5, 40, seed=3, batch_size=2) == a
    assert generate.sample_records(model, 5, 40, seed=4, batch_size=2) != a


def test_samples_follow_what_the_model_learned(tiny_cfg):
    # A model trained on one repeated phrase replays that phrase's bytes, an untrained one does not.
    phrase = "abcabcabc " * 200
    model = GPT(tiny_cfg)
    untrained = "".join(generate.sample_records(model, 4, 30, seed=0))
    train(model, TrainConfig(domains=("x",), steps=60, batch_size=8, lr=1e-2, warmup_steps=5, eval_every=1000,
                             precision="fp32"), {"x": data.encode([phrase])}, {})
    learned = "".join(generate.sample_records(model, 4, 30, seed=0))
    share = lambda s: sum(c in "abc " for c in s) / max(len(s), 1)  # noqa: E731
    assert share(learned) > 0.9 > share(untrained)


def test_bad_arguments_are_named(tiny_cfg):
    with pytest.raises(ValueError, match="sample_records: expected n >= 1"):
        generate.sample_records(GPT(tiny_cfg), 0, 10, seed=0)
    with pytest.raises(ValueError, match="temperature > 0"):
        generate.sample_records(GPT(tiny_cfg), 1, 10, seed=0, temperature=0.0)
