from hst.config import GateConfig
from hst.promotion import alarms, gate_failures

REPORT = {"forgetting": {"python": 0.01, "shakespeare": 0.049}, "routing_stability_mean": 0.93}


def test_gate_passes_within_limits_and_names_every_failure():
    assert gate_failures(REPORT, GateConfig()) == []
    strict = GateConfig(max_forgetting=0.02, min_routing_stability=0.95)
    assert gate_failures(REPORT, strict) == ["forgetting on shakespeare +4.90% > 2.00%",
                                             "routing stability 93.00% < 95.00%"]


def test_alarms_use_the_seed_thresholds_and_skip_stability_for_dense_models():
    assert alarms({**REPORT, "forgetting": {"python": 0.051}}) == ["forgetting on python +5.10% > 5.00%"]
    assert alarms({"forgetting": {"python": 0.0}, "routing_stability_mean": None}) == []
    assert alarms({**REPORT, "routing_stability_mean": 0.89}) == ["routing stability 89.00% < 90.00%"]


def test_a_non_finite_metric_always_fails_the_gate_and_alarms():
    nan = float("nan")
    assert gate_failures({**REPORT, "forgetting": {"python": nan, "shakespeare": 0.0}}, GateConfig()) == [
        "forgetting on python is nan"]
    assert gate_failures({**REPORT, "routing_stability_mean": float("inf")}, GateConfig()) == ["routing stability is inf"]
    assert alarms({**REPORT, "forgetting": {"python": None}}) == ["forgetting on python is None"]
