from hst import inbox


def test_inbox_claims_each_file_once_moves_never_deletes(tmp_path):
    box = tmp_path / "inbox"
    box.mkdir()
    (box / "a.txt").write_text("alpha " * 100)
    (box / "b.txt").write_text("beta " * 100)
    (box / ".partial.txt").write_text("upload in progress")
    assert inbox.pending_bytes(box) == 600 + 500
    first = inbox.claim(box, "inbox1")
    assert [p.name for p in first] == ["a.txt", "b.txt"]
    assert all(p.parent == box / "processed/inbox1" and p.is_file() for p in first)
    assert inbox.pending(box) == [] and inbox.claim(box, "inbox2") == []
    # The same content dropped again, under another name: set aside, not learned twice.
    (box / "a_again.txt").write_text("alpha " * 100)
    assert inbox.pending(box) == []
    (box / "c.txt").write_text("gamma " * 50)
    (box / "bad.txt").write_bytes(b"\xff\xfe not utf-8")
    second = inbox.claim(box, "inbox2")
    assert [p.name for p in second] == ["c.txt"]
    assert (box / "processed/duplicates/a_again.txt").is_file()
    assert (box / "processed/rejected/bad.txt").is_file()
    assert (box / ".partial.txt").is_file()
    assert inbox.batch_text(box, "inbox1") == "alpha " * 100 + "\n\n" + "beta " * 100 + "\n"
    assert {v["batch"] for v in inbox.ledger(box).values()} == {"inbox1", "inbox2"}


def test_harvest_moves_the_served_log_into_one_inbox_file_of_distinct_texts(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    log, box = tmp_path / "served", tmp_path / "inbox"
    log.mkdir()
    box.mkdir()
    for n, texts in enumerate([["a question", "b question"], ["a question", "c question\n"]]):
        pq.write_table(pa.table({"record_id": [t.strip() for t in texts], "text": texts}), log / f"served-x-{n}.parquet")
    (log / "served-x-2.parquet").write_bytes(b"not parquet")
    out = inbox.harvest(log, box)
    assert out.parent == box and out.read_text() == "a question\n\nb question\n\nc question\n"
    assert sorted(p.name for p in (log / "harvested").iterdir()) == ["served-x-0.parquet", "served-x-1.parquet"]
    assert (log / "rejected/served-x-2.parquet").is_file()
    assert "not a readable Smart Sampler buffer" in (log / "rejected/served-x-2.parquet.reason").read_text()
    assert inbox.harvest(log, box) is None  # nothing new was served
