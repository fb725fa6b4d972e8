"""Every generated table in docs/ is what its script makes from the committed runs: regenerate each
into a copy of its document and compare (a table edited by hand, or left behind by a changed run or
script, fails here)."""

import importlib
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BASELINES = ["--variant", "dense finetune=docs/runs/pareto/dense_finetune_1x",
             "--variant", "dense + replay=docs/runs/pareto_2threads/dense_replay_1x"]
PARETO = {"pareto": "docs/runs/pareto", "pareto-2threads": "docs/runs/pareto_2threads",
          "pareto-seed1": "docs/runs/pareto_seed1", "pretrain2x": "docs/runs/pretrain2x",
          "pretrain2x-seed1": "docs/runs/pretrain2x_seed1", "pareto-epyc": "docs/runs/pareto_epyc"}
TABLES = {  # name -> (document, script and its arguments, the flag naming the document)
    "results": ("docs/pipeline.md", ["results_table", "--variant", "HST=workspace", *BASELINES], "--doc"),
    **{name: ("docs/results.md", ["pareto", "--runs", runs, "--section", name, "--figure", "{tmp}/figure.png"], "--out")
       for name, runs in PARETO.items()},
    "compare": ("docs/results.md", ["compare_table"], "--out"),
    "density": ("docs/results.md", ["density_table", "--variant", "density 1.0=docs/runs/density_1.0",
                                    "--variant", "density 0.05=docs/runs/density_0.05"], "--out"),
    "fars": ("docs/results.md", ["fars_study", "--table-only", "--plot", "{tmp}/figure.png"], "--out"),
    "stream": ("docs/results.md", ["stream_table", "--run", "docs/runs/stream"], "--out"),
}


@pytest.mark.parametrize("name", list(TABLES))
def test_a_generated_table_is_what_its_script_makes(name, tmp_path, monkeypatch):
    doc, (script, *args), flag = TABLES[name]
    copy = tmp_path / Path(doc).name
    shutil.copy(ROOT / doc, copy)
    monkeypatch.chdir(ROOT)  # the scripts' paths are the project's
    monkeypatch.setattr(sys, "argv", [script, *(a.format(tmp=tmp_path) for a in args), flag, str(copy)])
    importlib.import_module(f"scripts.{script}").main()
    assert f"<!-- {name}:start -->" in copy.read_text()
    assert copy.read_text() == (ROOT / doc).read_text(), f"{doc}: table {name!r} is stale; rerun scripts.{script}"
