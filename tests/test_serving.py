"""Serving: request checks, answers equal to the model's own, the served log, following the champion,
and the real `mlflow models serve` process over HTTP."""

import os
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from hst import checkpoint, registry, sampler, served_log, serving, tracking
from hst.config import ServeConfig
from hst.model import GPT

CFG = ServeConfig(flush_every=2, flush_seconds=0.2, reload_seconds=0.2, max_rows=4, max_text_bytes=100,
                  max_new_bytes=20)


@pytest.fixture
def ckpt(tmp_path, tiny_cfg) -> Path:
    torch.manual_seed(0)
    checkpoint.save(tmp_path / "a.pt", GPT(tiny_cfg))
    return tmp_path / "a.pt"


@pytest.mark.parametrize("rows, message", [
    ([{"txt": "a"}], "unknown column(s) ['txt']"),
    ([{"text": "a", "prompt": "b"}], "row 0: expected either text (score) or prompt (generate)"),
    ([{"text": "a"}, {"max_new_bytes": 3}], "row 1: expected either text (score) or prompt (generate), got neither"),
    ([{"text": ""}], "row 0: text: expected non-empty text"),
    ([{"text": 5}], "row 0: text: expected a string, got int"),
    ([{"text": "ü" * 51}], "row 0: text: 102 bytes, over the limit of 100 (serve.max_text_bytes)"),
    ([{"prompt": "a", "temperature": -1.0}], "row 0: temperature: expected a finite number >= 0, got -1.0"),
    ([{"prompt": "a", "temperature": float("nan")}], "row 0: temperature: expected a finite number >= 0, got nan"),
    ([{"prompt": "a", "max_new_bytes": 21}], "row 0: max_new_bytes: expected an integer in [1, 20], got 21"),
    ([{"prompt": "a", "max_new_bytes": 2.5}], "row 0: max_new_bytes: expected an integer in [1, 20], got 2.5"),
    ([{"prompt": "a", "seed": 1}, {"prompt": "b"}], "row 1: seed: expected an integer"),
    ([{"text": "a"}] * 5, "expected 1 to 4 rows (serve.max_rows), got 5"),
])
def test_a_bad_request_is_one_line_naming_row_and_column(rows, message):
    with pytest.raises(serving.RequestError) as e:
        serving.parse_request(pd.DataFrame(rows), CFG)
    assert message in e.value.message and "\n" not in e.value.message
    assert e.value.get_http_status_code() == 400


def test_good_rows_get_their_defaults():
    rows = serving.parse_request(pd.DataFrame([{"text": "x"}, {"prompt": "y", "temperature": 0}]), CFG)
    assert rows == [{"kind": "score", "text": "x"},
                    {"kind": "generate", "prompt": "y", "max_new_bytes": 20, "temperature": 0.0, "seed": 0}]


def test_answers_equal_the_models_own_and_every_row_is_logged_once(ckpt, tmp_path):
    served = serving.Served(ckpt, CFG, str(tmp_path / "log"))
    model = served.model
    text, prompt = "the quick brown fox", "once upon"
    score, greedy, sampled, again = served.answer(serving.parse_request(pd.DataFrame(
        [{"text": text}, {"prompt": prompt, "max_new_bytes": 8, "temperature": 0.0, "seed": 0},
         {"prompt": prompt, "max_new_bytes": 8, "temperature": 1.0, "seed": 7},
         {"prompt": prompt, "max_new_bytes": 8, "temperature": 1.0, "seed": 7}]), CFG))
    (routed,) = sampler.route_records(model, [text])
    assert score["bpb"] == pytest.approx(routed.bpb) and score["n_bytes"] == 19 and score["model"] == registry.md5(ckpt)
    # Greedy generation with the KV cache equals re-running the whole context for every byte.
    context = torch.tensor([list(prompt.encode())])
    with torch.no_grad():
        for _ in range(8):
            context = torch.cat([context, model(context).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert greedy["text"].encode("utf-8", "replace") == bytes(context[0, len(prompt):].tolist()).decode(
        "utf-8", "replace").encode("utf-8", "replace")
    assert sampled == again and sampled["n_bytes"] == 8
    served.log.close()
    table = pa_table(tmp_path / "log")
    assert table["text"].to_pylist() == [text, prompt, prompt, prompt]
    assert table["kind"].to_pylist() == ["score", "generate", "generate", "generate"]
    assert table["seq"].to_pylist() == [0, 1, 2, 3] and len(set(table["request_id"].to_pylist())) == 4
    assert table["bpb"][0].as_py() == pytest.approx(routed.bpb)


def pa_table(log_dir: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(f) for f in sorted(log_dir.glob(served_log.SERVED_GLOB))])


def test_the_log_writes_in_batches_and_after_a_while_and_never_raises(tmp_path):
    row = {"record_id": "r", "source": "served", "text": "t", "n_tokens": 1, "expert_counts": [{0: 1}],
           "primary_expert": [0], "mean_max_sim": [0.5], "bpb": 1.0, "request_id": "q", "kind": "score",
           "received_at": pd.Timestamp.now(tz="UTC")}
    log = served_log.ServedLog(tmp_path / "log", flush_every=3, flush_seconds=0.3)
    log.add([row] * 3)  # a full batch is written at once
    log.add([row])  # a lone row after flush_seconds
    time.sleep(1.0)
    assert log.stats() | {"dir": ""} == {"logged": 4, "files": 2, "dropped_full": 0, "dropped_behind": 0, "failed": 0,
                                         "pending": 0, "dir": ""}
    log.close()
    # A log at its size limit counts what it drops; an unwritable folder counts what it failed to write.
    full = served_log.ServedLog(tmp_path / "log", max_bytes=1)
    full.add([row])
    assert full.stats()["dropped_full"] == 1
    full.close()
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    broken = served_log.ServedLog(blocked / "log", flush_every=1)
    broken.add([row])
    broken.close()
    assert broken.stats()["logged"] == 0 and broken.stats()["dropped_full"] + broken.stats()["failed"] == 1


def test_the_server_follows_the_champion_alias(ckpt, tmp_path, tiny_cfg):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    package = lambda c, out: serving.save_model(c, out, CFG)  # noqa: E731
    gate = {"passed": True, "reasons": [], "alarms": [], "champion": "c1"}
    run = tracking.log_cycle(uri, "e", "v", "k", {}, {}, "c1", 1, REPORT, gate, {}, [], {})["run_id"]
    registry.register_cycle(uri, "m", run, "c1", ckpt, ckpt, gate, package)
    served = serving.Served(ckpt, CFG, "", (uri, "m"))
    first = served.answer([{"kind": "score", "text": "abc"}])[0]["model"]
    torch.manual_seed(1)
    checkpoint.save(tmp_path / "b.pt", GPT(tiny_cfg))
    run = tracking.log_cycle(uri, "e", "v", "k", {}, {}, "c2", 2, REPORT, gate | {"champion": "c2"}, {}, [], {})["run_id"]
    registry.register_cycle(uri, "m", run, "c2", tmp_path / "b.pt", tmp_path / "b.pt", gate | {"champion": "c2"}, package)
    deadline = time.monotonic() + 30
    while served.answer([{"kind": "score", "text": "abc"}])[0]["model"] == first and time.monotonic() < deadline:
        time.sleep(0.2)
    assert served.answer([{"kind": "score", "text": "abc"}])[0]["model"] == registry.md5(tmp_path / "b.pt") != first


REPORT = {"bpb": {}, "forgetting": {}, "avg_forgetting": 0.0, "worst_forgetting": 0.0, "absorption": 1.0,
          "backward_transfer": 0.0, "forward_transfer": 0.0, "experts_per_layer": [4, 4]}


def test_mlflow_models_serve_answers_refuses_bad_requests_and_logs_exactly_the_good_ones(ckpt, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    gate = {"passed": True, "reasons": [], "alarms": [], "champion": "c1"}
    run = tracking.log_cycle(uri, "e", "v", "k", {}, {}, "c1", 1, REPORT, gate, {}, [], {})["run_id"]
    registry.register_cycle(uri, "tiny", run, "c1", ckpt, ckpt, gate,
                            lambda c, out: serving.save_model(c, out, ServeConfig(), "tiny", uri))
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "HST_SERVE_LOG_DIR": str(tmp_path / "served"),
           "OMP_NUM_THREADS": "1"}
    proc, url = serving.start_server("models:/tiny@champion", tmp_path, env)
    try:
        status, body = serving.invoke(url, [{"text": "hello served world"}])
        assert status == 200 and body["predictions"][0]["n_bytes"] == 18
        assert body["predictions"][0]["model"] == registry.md5(ckpt)
        status, body = serving.invoke(url, [{"prompt": "to be", "max_new_bytes": 5, "temperature": 0.5, "seed": 3}])
        assert status == 200 and body["predictions"][0]["n_bytes"] == 5
        for bad, message in [(b'{"dataframe_records": [{"text": ', ""),
                             ([{"txt": "a"}], "unknown column(s) ['txt']"),
                             ([{"prompt": "a", "temperature": -1}], "row 0: temperature"),
                             ([{"text": ""}], "row 0: text: expected non-empty text"),
                             (b'{"dataframe_records": [{"text": "\xff\xfe"}]}', "")]:
            status, body = serving.invoke(url, bad)
            assert 400 <= status < 500, (bad, status, body)
            assert message in body.get("message", "") and ("\n" not in body["message"] or not message)
        status, _ = serving.invoke(url, [{"text": "still up"}])
        assert status == 200
    finally:
        serving.stop_server(proc)  # SIGTERM: the server writes what is pending before it exits
    table = pa_table(tmp_path / "served")
    assert table["text"].to_pylist() == ["hello served world", "to be", "still up"]
