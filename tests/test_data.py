import gzip
import math
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from hst import data
from hst.config import PrepareConfig
from hst.data import DataError

TEXT = "\n\n".join(f"Paragraph {i}.\n" + "word " * (i % 40 + 1) for i in range(400))


def cfg(**kw):
    return PrepareConfig(domains={"a": "x"}, **kw)


def test_records_respect_size_bounds_and_keep_all_text():
    recs = data.cut_records(TEXT, 200, 600)
    sizes = [len(r.encode()) for r in recs]
    assert max(sizes) <= 600 and sum(s < 200 for s in sizes) <= 1
    assert "".join(recs).split() == TEXT.split()


def test_long_paragraph_is_cut_at_line_boundaries():
    para = "\n".join(f"line {i} " + "x" * 50 for i in range(100))
    recs = data.cut_records(para, 10, 500)
    assert all(len(r.encode()) <= 500 for r in recs)
    assert "\n".join(recs).splitlines() == para.splitlines()


def test_split_is_deterministic_order_independent_and_near_fractions():
    c = cfg(val_fraction=0.1, test_fraction=0.1, min_record_bytes=1, max_record_bytes=100)
    recs = [f"record number {i}" for i in range(4000)]
    assign = {r: data.assign_split(r, c) for r in recs}
    assert {r: data.assign_split(r, c) for r in reversed(recs)} == assign
    share = sum(v == "val" for v in assign.values()) / len(recs)
    assert 0.08 < share < 0.12
    other = {r: data.assign_split(r, cfg(val_fraction=0.1, test_fraction=0.1, seed=1)) for r in recs}
    assert other != assign


def test_sources_txt_gz_jsonl_parquet(tmp_path):
    (tmp_path / "a.txt").write_text("hello\n\nworld")
    (tmp_path / "b.txt.gz").write_bytes(gzip.compress("hallo welt".encode()))
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in ["one", "two"]))
    pq.write_table(pa.table({"text": ["x", "y", "z"]}), tmp_path / "d.parquet")
    assert data.read_source(tmp_path / "a.txt") == ["hello\n\nworld"]
    assert data.read_source(tmp_path / "b.txt.gz") == ["hallo welt"]
    assert data.read_source(tmp_path / "c.jsonl") == ["one", "two"]
    assert data.read_source(tmp_path / "d.parquet") == ["x", "y", "z"]


@pytest.mark.parametrize("name, content, message", [
    ("missing.txt", None, "file not found"),
    ("empty.txt", b"  \n\n ", "no text"),
    ("latin1.txt", "Grüße".encode("latin-1"), "not UTF-8"),
    ("bad.jsonl", b'{"text": "ok"}\n{"txt": "no"}\n', "bad.jsonl:2: expected an object"),
    ("broken.jsonl", b'{"text": \n', "not valid JSON"),
    ("broken.parquet", b"PAR1 garbage", "not a readable Parquet"),
    ("data.csv", b"a,b", "unsupported file type"),
])
def test_bad_sources_give_one_line_errors(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=message) as e:
        data.read_source(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_split_domain_and_round_trip(tmp_path):
    src = tmp_path / "t.txt"
    src.write_text(TEXT)
    splits = data.split_domain(src, cfg(min_record_bytes=100, max_record_bytes=400))
    assert sum(map(len, splits.values())) == len(data.cut_records(TEXT, 100, 400))
    data.write_split(data.split_path(tmp_path / "p", "a", "val"), splits["val"])
    assert data.load_records(tmp_path / "p", "a", "val") == splits["val"]
    tokens = data.load_tokens(tmp_path / "p", "a", "val")
    assert tokens.dtype == torch.uint8 and bytes(tokens.tolist()).decode() == "\n\n".join(splits["val"])


def test_unigram_bpb():
    uniform = torch.arange(256, dtype=torch.uint8).repeat(100)
    assert data.unigram_bpb(uniform, uniform) == pytest.approx(8.0)
    skewed = torch.tensor([65] * 1000 + [66] * 1000, dtype=torch.uint8)
    assert data.unigram_bpb(skewed, skewed) == pytest.approx(-math.log2(1001 / 2256))  # add-one smoothing


def test_window_starts_cover_the_stream():
    starts = data.window_starts(1000, 99, 10)
    assert starts[0] == 0 and starts[-1] == 900 and len(starts) == 10
    with pytest.raises(DataError):
        data.window_starts(50, 99, 10)


def test_no_record_exceeds_max_record_bytes_however_the_text_is_laid_out():
    words = " ".join(f"wörd{i}" for i in range(20_000))  # one 150 kB line with spaces
    solid = "é" * 30_000 + "x"  # one 60 kB line without any, two bytes a character
    for text in (words, solid, "short line\n" + words + "\nanother"):
        records = data.cut_records(text, 256, 2048)
        assert max(len(r.encode()) for r in records) <= 2048
        assert "".join(records).replace(" ", "").replace("\n", "") == text.replace(" ", "").replace("\n", "")
    assert data.cut_records("a b c", 256, 2048) == ["a b c"]  # short text: as before


def test_a_domain_source_that_is_not_a_regular_file_is_refused_without_reading_it(tmp_path):
    fifo = tmp_path / "feed.txt"
    os.mkfifo(fifo)  # reading it would block forever
    (tmp_path / "dir.txt").mkdir()
    for path in (fifo, tmp_path / "dir.txt"):
        with pytest.raises(DataError, match="not a regular file"):
            data.read_source(path)
