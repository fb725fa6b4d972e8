import copy
from pathlib import Path

import pytest
import yaml

from hst.config import ConfigError, CycleConfig, FlowConfig, GateConfig, GrowConfig, ModelConfig, TrackingConfig, TrainConfig
from hst.params import SECTIONS, build, check_params


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"params.yaml:model: unknown key\(s\) \['n_expert'\]"):
        build(ModelConfig, {"n_expert": 8}, "params.yaml:model")


@pytest.mark.parametrize("section, message", [
    ({"n_experts": "8"}, "model.n_experts: expected int, got str"),
    ({"n_experts": 2.5}, "model.n_experts: expected int"),
    ({"router_temperature": True}, "model.router_temperature: expected finite float"),
    ({"ffn": "sparse"}, "model.ffn: expected one of"),
    ({"top_k": 9}, "model.top_k: expected 1..n_experts=8"),
    ({"n_head": 3}, "model.n_head: expected a divisor"),
    ({"routing": "top_any"}, "model.routing: top_any needs the learned router"),
    ({"routing": "all"}, "model.routing: expected one of"),
    ({"ffn": "learned", "router_floor": 1.0}, r"model.router_floor: expected in \[0, 1\)"),
    ({"router_floor": 0.1}, "model.router_floor: needs the learned router"),
])
def test_wrong_types_and_ranges_are_named(section, message):
    with pytest.raises(ConfigError, match=message):
        build(ModelConfig, section, "model")


def test_int_is_accepted_for_float_and_lists_for_tuples():
    cfg = build(TrainConfig, {"domains": ["a", "b"], "lr": 1, "betas": [0.9, 0.99]}, "pretrain")
    assert cfg.domains == ("a", "b") and cfg.lr == 1 and cfg.betas == (0.9, 0.99)
    with pytest.raises(ConfigError, match="pretrain.domains: expected"):
        build(TrainConfig, {"domains": "a"}, "pretrain")


def test_configs_are_frozen():
    with pytest.raises(Exception):
        ModelConfig().d_model = 3


def test_tracking_names_default_to_the_scenario_and_flow_limits_are_checked():
    assert TrackingConfig().resolve("dense-full") == TrackingConfig("hst", "hst-dense-full")
    assert TrackingConfig("mine").resolve("key-grow") == TrackingConfig("mine", "mine-key-grow")
    assert TrackingConfig("mine", "model").resolve("key-grow").registered_model == "model"
    with pytest.raises(ConfigError, match="params.yaml:flow.min_inbox_bytes: expected >= 1"):
        build(FlowConfig, {"min_inbox_bytes": 0}, "params.yaml:flow")


@pytest.mark.parametrize("cls, section, message", [
    (CycleConfig, {"replay": "disk"}, r"cycle.replay: expected one of \('stored', 'generated'\), got 'disk'"),
    (CycleConfig, {"replay_records": 1}, "cycle.replay_records: expected >= 2"),
    (CycleConfig, {"replay": False}, "cycle.replay: expected str, got bool"),
    (CycleConfig, {"mode": "adapters"}, r"cycle.mode: expected one of \('grow', 'experts'"),
    (GrowConfig, {"lr": 0}, "grow.lr: expected > 0"),
    (GrowConfig, {"gate_fpr": 1.5}, r"grow.gate_fpr: expected in \(0, 1\)"),
    (GrowConfig, {"gate_hidden": -1}, "grow.gate_hidden: expected >= 0"),
    (GrowConfig, {"old_share": 1.0}, r"grow.old_share: expected in \[0, 1\)"),
    (GrowConfig, {"forgetting_budget": -0.01}, r"grow.forgetting_budget: expected in \[0, 1\)"),
    (GrowConfig, {"gate_hidden": 1.5}, "grow.gate_hidden: expected int, got float"),
])
def test_cycle_and_growth_params_are_checked(cls, section, message):
    with pytest.raises(ConfigError, match=message):
        build(cls, section, cls.__name__.removesuffix("Config").lower())


@pytest.mark.parametrize("cls, key", [(TrainConfig, "lr"), (TrainConfig, "weight_decay"), (GrowConfig, "lr"),
                                      (GateConfig, "max_forgetting"), (CycleConfig, "new_old_ratio"),
                                      (ModelConfig, "router_temperature"), (FlowConfig, "retry_delay_seconds")])
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_every_float_param_must_be_finite(cls, key, value):
    with pytest.raises(ConfigError, match=f"s.{key}: expected finite float, got float {value}"):
        build(cls, {key: value}, "s")
    with pytest.raises(ConfigError, match=r"s.betas: expected tuple"):
        build(TrainConfig, {"betas": [0.9, value]}, "s")


def test_the_whole_params_file_is_checked():
    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    assert set(check_params(params)) == set(SECTIONS) - {"cycles"}
    for edit, message in [
        (lambda p: p["cycle"].update(lr=0.1), r"params.yaml:cycle: unknown key\(s\) \['lr'\]"),
        (lambda p: p.update(consolidation={}), r"params.yaml: unknown section\(s\) \['consolidation'\]"),
        (lambda p: p.pop("gate"), r"params.yaml: missing section\(s\) \['gate'\]"),
        (lambda p: p["cycles"]["c1_kjv"].update(domain="klingon"), "cycles.c1_kjv.domain: expected one of prepare"),
        (lambda p: p["cycles"]["c1_kjv"].update(prev="c4_gcide"), "cycles.c1_kjv.prev: expected pretrain or an earlier"),
        (lambda p: p["cycles"]["c1_kjv"].update(steps=3), "cycles.c1_kjv: expected a mapping with exactly"),
        (lambda p: p["pretrain"].update(domains=["kjv", "nope"]), r"pretrain.domains: expected .* unknown \['nope'\]"),
        (lambda p: p["model"].update(ffn="learned"), "cycle.mode: 'grow' needs model.ffn key, got 'learned'"),
        (lambda p: p.update(model={**p["model"], "ffn": "dense"}, cycle={**p["cycle"], "mode": "experts"}),
         "cycle.mode: 'experts' needs model.ffn key or learned"),
        (lambda p: p["flow"].update(retries=-1), "flow.retries: expected >= 0"),
        (lambda p: p["flow"].update(inbox_interval_seconds=0), "flow.inbox_interval_seconds: expected >= 1"),
        (lambda p: p["flow"].update(workers=2), r"params.yaml:flow: unknown key\(s\) \['workers'\]"),
    ]:
        bad = copy.deepcopy(params)
        edit(bad)
        with pytest.raises(ConfigError, match=message):
            check_params(bad)


def test_a_bad_choice_is_one_line_naming_the_key():
    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    params["cycle"]["replay"] = "disk"
    with pytest.raises(ConfigError) as e:
        check_params(params)
    assert str(e.value) == "params.yaml:cycle.replay: expected one of ('stored', 'generated'), got 'disk'"


def test_config_defaults_are_the_shipped_params():
    """A stage built from an empty section behaves like the default pipeline."""
    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    for cls, name in [(ModelConfig, "model"), (CycleConfig, "cycle"), (GrowConfig, "grow"), (GateConfig, "gate")]:
        assert build(cls, params[name], name) == cls(), name


def test_the_large_preset_is_valid_and_differs_only_in_model_and_pretrain():
    root = Path(__file__).resolve().parents[1]
    shipped, large = (yaml.safe_load((root / p).read_text()) for p in ("params.yaml", "presets/large.yaml"))
    configs = check_params(large, "presets/large.yaml")
    assert {k for k in shipped if shipped[k] != large[k]} == {"model", "pretrain"}
    model = configs["model"]
    assert (model.d_model, model.n_layer, model.n_experts, model.top_k) == (512, 8, 64, 2)
    assert configs["pretrain"].batch_size % 8 == 0  # splits over 1, 2, 4 or 8 torchrun processes


def test_the_stream_preset_is_valid_repeats_every_cycle_domain_and_differs_only_in_cycles():
    root = Path(__file__).resolve().parents[1]
    shipped, stream = (yaml.safe_load((root / p).read_text()) for p in ("params.yaml", "presets/stream.yaml"))
    check_params(stream, "presets/stream.yaml")
    assert {k for k in shipped if shipped[k] != stream[k]} == {"cycles", "prepare"} and len(stream["cycles"]) >= 13
    mixed = {"german_manpages": "data/corpus/german_manpages.parquet"}  # scripts/mix_drop.py
    assert stream["prepare"] == {**shipped["prepare"], "domains": {**shipped["prepare"]["domains"], **mixed}}
    domains = [c["domain"] for c in stream["cycles"].values()]
    assert domains[-1] == "german_manpages" and (root / mixed["german_manpages"]).is_file()
    assert {d: domains[:-1].count(d) for d in domains[:-1]} == {c["domain"]: 3 for c in shipped["cycles"].values()}


@pytest.mark.parametrize("section, message", [
    ({"decide": "sometimes"}, "grow.decide: expected novelty or always, got 'sometimes'"),
    ({"min_records": 0}, "grow.min_records: expected >= 1"),
    ({"select": "mlp"}, "grow.select: expected gate or posterior, got 'mlp'"),
    ({"select": "posterior", "old_share": 0.2}, "grow.old_share: expected 0 with select: posterior"),
])
def test_growth_selection_is_checked(section, message):
    with pytest.raises(ConfigError, match=message):
        build(GrowConfig, section, "grow")


def test_a_params_file_with_a_repeated_key_or_bytes_that_are_not_utf8_is_refused_in_one_line(tmp_path):
    from hst.params import load_section, read_params

    path = tmp_path / "params.yaml"
    path.write_text("model:\n  n_layer: 4\n  d_model: 256\n  n_layer: 8\ncycle: {}\n")
    with pytest.raises(ConfigError, match=r"params.yaml:4: not valid YAML \(duplicate key 'n_layer'\)"):
        load_section(path, "model")
    path.write_text("model: {n_layer: 4}\nmodel: {n_layer: 8}\n")
    with pytest.raises(ConfigError, match="duplicate key 'model'"):
        read_params(path)
    path.write_bytes("model: {ffn: key}  # Grüße\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"params.yaml: not UTF-8 text \(invalid byte at offset 23\)"):
        read_params(path)
    path.write_text("model: {n_layer: 4}\ncycle: {seed: 1}\n")  # keys repeated across mappings are fine
    assert read_params(path) == {"model": {"n_layer": 4}, "cycle": {"seed": 1}}
