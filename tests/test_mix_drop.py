import sys

import pyarrow.parquet as pq
import yaml

from hst import data
from hst.config import PrepareConfig
from scripts import mix_drop


def test_a_mixed_drop_alternates_the_domains_and_every_record_keeps_its_split(tmp_path, monkeypatch):
    cfg = PrepareConfig(domains={"a": "a.txt", "b": "b.txt"}, min_record_bytes=20, max_record_bytes=200)
    for name, word in (("a", "alpha"), ("b", "beta")):
        (tmp_path / f"{name}.txt").write_text("\n\n".join(f"{word} paragraph number {i} " * 3 for i in range(400)))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"prepare": {**cfg.__dict__, "domains": cfg.domains}}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["mix_drop", "--domains", "a", "b", "--train", "5", "--out", "drop.parquet"])
    mix_drop.main()
    rows = pq.read_table("drop.parquet").column("text").to_pylist()
    alone = {d: data.split_domain(f"{d}.txt", cfg) for d in ("a", "b")}
    mixed = data.split_domain("drop.parquet", cfg)  # as prepare splits the drop
    for split in data.SPLITS:
        want = len(alone["a"][split]) + len(alone["b"][split]) if split != "train" else 10
        assert len(mixed[split]) == want
        assert set(mixed[split]) <= set(alone["a"][split]) | set(alone["b"][split])  # no record changed split
    train = [r for r in rows if r in set(mixed["train"])]
    assert [r.startswith("alpha") for r in train] == [True, False] * 5  # one record of each domain in turn
