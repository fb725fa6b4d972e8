import pyarrow as pa
import pytest

from hst import coreset
from hst.sampler import SCHEMA


def table(primaries, prefix):
    rows = [{"record_id": f"{prefix}{i}", "source": prefix, "seq": i, "text": f"{prefix} text {i}",
             "n_tokens": 10, "expert_counts": [[(p, 20)] for p in prim], "primary_expert": list(prim),
             "mean_max_sim": [0.5] * len(prim), "bpb": 2.0}
            for i, prim in enumerate(primaries)]
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def test_select_experts_applies_min_new_data_per_layer():
    new = table([(0, 3)] * 5 + [(1, 3)] * 2 + [(0, 2)], "n")
    assert coreset.select_experts(new, 2, min_new_data=2) == [(0, 0, 6), (0, 1, 2), (1, 3, 7)]
    assert coreset.select_experts(new, 2, min_new_data=7) == [(1, 3, 7)]


def test_coreset_mixes_new_and_old_routed_to_the_expert_at_the_ratio():
    new = table([(0, 0)] * 5 + [(1, 0)] * 3, "n")
    old = table([(0, 1)] * 30 + [(1, 1)] * 30, "o")
    cs = coreset.build_coreset(new, old, layer=0, expert=0, new_old_ratio=0.2, seed=1)
    assert cs["kind"].value_counts().to_dict() == {"old": 20, "new": 5}
    assert set(cs[cs.kind == "new"].record_id) == {f"n{i}" for i in range(5)}
    assert set(cs[cs.kind == "old"].record_id) <= {f"o{i}" for i in range(30)}  # routed to expert 0
    again = coreset.build_coreset(new, old, layer=0, expert=0, new_old_ratio=0.2, seed=1)
    assert again.equals(cs)
    assert list(cs.columns) == ["record_id", "source", "kind", "text"]


def test_coreset_uses_all_old_records_when_too_few_and_checks_ratio():
    new = table([(0,)] * 5, "n")
    old = table([(0,)] * 3 + [(1,)] * 50, "o")
    cs = coreset.build_coreset(new, old, layer=0, expert=0)
    assert cs["kind"].value_counts().to_dict() == {"new": 5, "old": 3}
    with pytest.raises(ValueError, match="new_old_ratio"):
        coreset.build_coreset(new, old, 0, 0, new_old_ratio=0)


def test_a_cycle_gets_the_sets_its_mode_asks_for():
    new = table([(0, 1), (0, 2), (3, 1), (0, 1)], "new")
    old = table([(0, 1)] * 10 + [(2, 2)] * 5, "old")
    selection, sets = coreset.sets("experts", new, old, min_new_data=2, new_old_ratio=0.5)
    assert [e["name"] for e in selection] == ["L0_E0", "L1_E1"]
    assert [(e["new"], e["old"]) for e in selection] == [(3, 3), (3, 3)]
    (layer, expert, tokens, fresh), _ = sets
    assert (layer, expert) == (0, 0)
    assert bytes(fresh.tolist()).decode() == "new text 0\n\nnew text 1\n\nnew text 3"  # its new records only
    assert len(tokens) > len(fresh)  # its coreset adds old records
    for kind, n_old in (("new", 0), ("replay", 4)):
        (entry,), ((layer, expert, tokens, fresh),) = coreset.sets(kind, new, old, 2, 0.5)
        assert (entry["name"], entry["new"], entry["old"], layer, expert, fresh) == ("all", 4, n_old, None, None, None)
    assert coreset.sets("none", new, old, 2, 0.5) == ([], [])
