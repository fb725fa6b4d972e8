"""What a cycle does, by params (hst/cycle.py): the default trains in growth only, the baselines in
consolidation only, HST's expert mode in both."""

import pytest

from hst import cycle
from hst.config import CycleConfig, GrowConfig
from hst.params import load_section
from tests.project import ROOT


def test_default_params_grow_by_novelty_and_train_nothing_before():
    ccfg, gcfg = load_section(ROOT / "params.yaml", "cycle", CycleConfig), load_section(ROOT / "params.yaml", "grow", GrowConfig)
    ffn = load_section(ROOT / "params.yaml", "model")["ffn"]
    assert (cycle.coresets(ccfg), cycle.consolidation(ccfg), cycle.growth(ccfg, gcfg, ffn)) == ("none", "none", "by_novelty")


@pytest.mark.parametrize("mode, expect", [
    ("experts", ("experts", "experts")),
    ("full", ("new", "model")),
    ("full_replay", ("replay", "model")),
    ("grow", ("none", "none")),
])
def test_coresets_and_consolidation_follow_the_mode(mode, expect):
    ccfg = CycleConfig(mode=mode)
    assert (cycle.coresets(ccfg), cycle.consolidation(ccfg)) == expect


@pytest.mark.parametrize("mode, grow, ffn, expect", [
    ("grow", {}, "key", "by_novelty"),
    ("grow", {"decide": "always"}, "key", "all"),
    ("grow", {"select": "gate"}, "key", "all"),  # novelty decides between paths only
    ("experts", {}, "key", "novel"),  # the surprise detector decides
    ("full_replay", {}, "key", "novel"),
    ("experts", {}, "learned", "none"),  # growth needs the key router
    ("full_replay", {}, "dense", "none"),
    ("grow", {"enabled": False}, "key", "none"),
])
def test_growth(mode, grow, ffn, expect):
    assert cycle.growth(CycleConfig(mode=mode), GrowConfig(**grow), ffn) == expect
