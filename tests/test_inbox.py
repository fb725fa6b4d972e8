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
