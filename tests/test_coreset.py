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


def test_sets_round_trip_through_the_coreset_folder(tmp_path):
    new = table([(0, 1), (0, 2), (3, 1), (0, 1)], "new")
    old = table([(0, 1)] * 10 + [(2, 2)] * 5, "old")
    sets = {f"L{layer}_E{expert}": (layer, expert, coreset.build_coreset(new, old, layer, expert, 0.5, 0))
            for layer, expert, _ in coreset.select_experts(new, 2, 2)}
    coreset.write_sets(tmp_path / "cs", sets)
    selection, read = coreset.read_sets(tmp_path / "cs", new, per_expert=True)
    assert [e["name"] for e in selection] == ["L0_E0", "L1_E1"]
    assert [(e["new"], e["old"]) for e in selection] == [(3, 3), (3, 3)]
    (layer, expert, tokens, fresh), _ = read
    assert (layer, expert) == (0, 0)
    assert bytes(fresh.tolist()).decode() == "new text 0\n\nnew text 1\n\nnew text 3"  # its new records only
    assert len(tokens) > len(fresh)  # its coreset adds old records
    _, whole = coreset.read_sets(tmp_path / "cs", new, per_expert=False)
    assert [(s[0], s[1], s[3]) for s in whole] == [(None, None, None)] * 2
