import os
import subprocess
import sys
from pathlib import Path

import pytest

from hst import io


def test_atomic_write_keeps_the_old_file_on_error_and_leaves_no_temp(tmp_path):
    target = tmp_path / "a.json"
    io.write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with io.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert io.read_json(target) == {"v": 1} and os.listdir(tmp_path) == ["a.json"]


def test_committed_together_renames_all_targets_at_the_end_or_none(tmp_path):
    a, b, d = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "dir"
    for p in (a, b):
        io.write_text(p, "old")
    with pytest.raises(RuntimeError):
        with io.committed_together():
            io.write_text(a, "new")
            assert a.read_text() == "old"  # held back until the block ends
            raise RuntimeError("the stage fails after its first output")
    assert a.read_text() == b.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["a.txt", "b.txt"]
    with io.committed_together():
        io.write_text(a, "new")
        with io.atomic_path(d) as tmp:  # a directory target, with atomic files written inside it
            tmp.mkdir()
            io.write_text(tmp / "inner.txt", "x")  # inside a pending temp dir: written at once
            assert (tmp / "inner.txt").read_text() == "x"
        io.write_text(b, "new")
    assert a.read_text() == b.read_text() == "new" and (d / "inner.txt").read_text() == "x"
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "b.txt", "dir"]


def test_temp_files_of_a_dead_writer_are_removed_by_the_next_write(tmp_path):
    target = tmp_path / "model.pt"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".model.pt.{dead.stdout.strip()}.abc123"
    live = tmp_path / f".model.pt.{os.getpid()}.def456"  # a writer in this (running) process
    other = tmp_path / ".other.pt.1.xyz"
    for p in (stale, live, other):
        p.mkdir()
        (p / "model.pt").write_text("partial")
    io.write_text(target, "complete")
    assert not stale.exists() and live.exists() and other.exists() and target.read_text() == "complete"


@pytest.mark.parametrize("content, keys, message", [
    ("{oops", (), "not valid JSON"),
    ('{"a": 1}', ("a", "b"), r"missing key\(s\) \['b'\]"),
    ("[1, 2]", ("a",), "expected a JSON object"),
    ('{"a": 1}', None, "expected a JSON list"),
])
def test_read_json_names_the_file_and_what_is_wrong(tmp_path, content, keys, message):
    (tmp_path / "r.json").write_text(content)
    with pytest.raises(io.ArtifactError, match=f"r.json: {message}"):
        io.read_json(tmp_path / "r.json", keys)
    with pytest.raises(io.ArtifactError, match="nope.json: not found"):
        io.read_json(tmp_path / "nope.json")


def test_a_directory_output_is_exchanged_in_one_step_never_missing(tmp_path, monkeypatch):
    target = tmp_path / "out"
    with io.atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "a").write_text("old")
    moved = []
    real = os.replace
    monkeypatch.setattr(io.os, "replace", lambda src, dst: moved.append(Path(src)) or real(src, dst))
    with io.atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "b").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert target not in moved  # never renamed away: there is no moment without it
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the old directory went with the temp root
