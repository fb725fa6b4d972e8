import math

import pytest
import torch

from hst import sampler
from hst.data import DataError, record_id
from hst.model import GPT
from hst.router import Routing

TEXTS = [f"record {i}: " + "lorem ipsum dolor sit amet " * (i + 1) for i in range(5)]


def routing(ids, sim):
    ids = torch.tensor(ids)
    return Routing(ids, torch.full(ids.shape, 0.5), torch.tensor(sim), torch.zeros(len(ids), 4))


def test_summarize_counts_slots_and_breaks_ties_low():
    r0 = routing([[0, 1], [1, 2], [1, 0]], [0.1, 0.5, 0.6])
    r1 = routing([[3, 2], [2, 3], [0, 1]], [0.9, 0.9, 0.9])
    s = sampler.summarize([r0, r1], [4, 4])
    assert s["expert_counts"] == [{0: 2, 1: 3, 2: 1}, {0: 1, 1: 1, 2: 2, 3: 2}]
    assert s["primary_expert"] == [1, 2]
    assert s["mean_max_sim"] == pytest.approx([0.4, 0.9])


def test_route_records_covers_every_byte_in_windows(tiny_cfg):
    model = GPT(tiny_cfg)
    text = "x" * 70 + "ü"  # 72 bytes: windows of 32, 32, 8
    ((n, routing_, bpb, path),) = sampler.route_records(model, [text])
    assert path == 0
    assert n == 72 and [r.expert_ids.shape for r in routing_] == [(72, 2), (72, 2)]
    tokens = torch.tensor(list(text.encode()))
    with torch.no_grad():
        direct = model(tokens[None, 32:64]).routing
        # Surprise: every byte after the first, predicted from the earlier bytes of its window.
        nll = sum(float(torch.nn.functional.cross_entropy(model(tokens[None, s:s + 32]).logits[0, :len(y)], y,
                                                          reduction="sum"))
                  for s in (0, 32, 64) for y in [tokens[s + 1:s + 33]])
    assert torch.equal(routing_[1].expert_ids[32:64], direct[1].expert_ids)
    assert bpb == pytest.approx(nll / 71 / math.log(2), rel=1e-5)


def test_batched_routing_equals_one_window_at_a_time(tiny_cfg):
    """Windows of several records share a batch, padded to the longest: no record sees another's bytes."""
    model = GPT(tiny_cfg)
    texts = ["a" * 5, "b" * 70, "x" * 33, "ü" * 20]  # windows of 5; 32, 32, 6; 32, 1; 32, 8 bytes
    alone, batched = (sampler.route_records(model, texts, batch_windows=b) for b in (1, 3))
    for (n1, r1, b1, _), (n2, r2, b2, _) in zip(alone, batched):
        assert n1 == n2 and b1 == pytest.approx(b2, rel=1e-5)
        assert all(torch.equal(x.expert_ids, y.expert_ids) and torch.allclose(x.max_sim, y.max_sim, atol=1e-5)
                   for x, y in zip(r1, r2))


def test_records_are_flushed_atomically_and_logged_exactly_once(tiny_cfg, tmp_path):
    model = GPT(tiny_cfg)
    with sampler.SmartSampler(tmp_path, flush_every=2) as s:
        assert all(s.record(model, [t], "demo") == [True] for t in TEXTS)
        assert s.record(model, [TEXTS[0]], "demo") == [False]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "buffer-000000.parquet", "buffer-000001.parquet", "buffer-000002.parquet"]
    table = sampler.load_records(tmp_path)
    assert table.schema == sampler.SCHEMA
    assert table["record_id"].to_pylist() == [record_id(t) for t in TEXTS]
    assert table["n_tokens"].to_pylist() == [len(t.encode()) for t in TEXTS]
    counts = table["expert_counts"].to_pylist()[0]
    assert len(counts) == 2 and sum(c for _, c in counts[0]) == 2 * len(TEXTS[0])
    # A second run over the same texts (and one new text) logs only the new one.
    with sampler.SmartSampler(tmp_path) as again:
        assert again.record(model, TEXTS + ["new text", "new text"], "demo") == [False] * 5 + [True, False]
    assert sampler.load_records(tmp_path).num_rows == 6


def test_a_log_is_a_function_of_the_texts_served_with_a_logical_clock(tiny_cfg, tmp_path):
    """Same texts, same order: byte-identical files (a DVC output hash), whenever they are routed."""
    model = GPT(tiny_cfg)
    for run in ("a", "b"):
        with sampler.SmartSampler(tmp_path / run, flush_every=2) as s:
            for t in TEXTS[:3]:
                s.record(model, [t], "demo")
    assert [p.read_bytes() for p in sorted((tmp_path / "a").iterdir())] == \
           [p.read_bytes() for p in sorted((tmp_path / "b").iterdir())]
    # The clock counts on across flushes and across a resumed log; a skipped duplicate does not tick.
    with sampler.SmartSampler(tmp_path / "a") as again:
        again.record(model, [TEXTS[0], *TEXTS[3:]], "demo")
    table = sampler.load_records(tmp_path / "a")
    assert table["seq"].to_pylist() == [0, 1, 2, 3, 4]
    assert table["record_id"].to_pylist() == [record_id(t) for t in TEXTS]


def test_records_routed_before_an_error_are_not_lost(tiny_cfg, tmp_path):
    model = GPT(tiny_cfg)
    with pytest.raises(DataError):
        with sampler.SmartSampler(tmp_path) as s:
            s.record(model, [TEXTS[0]], "demo")
            s.record(model, [""], "demo")
    assert sampler.load_records(tmp_path).num_rows == 1


def test_corrupt_buffer_is_a_clear_error(tmp_path):
    (tmp_path / "buffer-000000.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="buffer-000000.parquet: not a readable Smart Sampler buffer"):
        sampler.load_records(tmp_path)
