from hst import runs


def test_variants_with_the_same_pretraining_start_from_the_first_ones_experiment(monkeypatch):
    calls = []
    monkeypatch.setattr(runs, "git", lambda *args: calls.append(("git", *args)) or "")
    monkeypatch.setattr(runs.subprocess, "run", lambda cmd, check: calls.append(tuple(cmd)))
    runs.run_experiments([("dense-ft", ["model.ffn=dense", "cycle.mode=full"]),
                          ("hst-2x", ["grow.steps=320"]),
                          ("dense-rp", ["cycle.mode=full_replay", "model.ffn=dense"])])
    exps = [c for c in calls if c[:3] == ("dvc", "exp", "run")]
    assert [c[4] for c in exps] == ["dense-ft", "hst-2x", "dense-rp"]
    applied = [c for c in calls if c[:3] == ("dvc", "exp", "apply")]
    assert applied == [("dvc", "exp", "apply", "dense-ft")]  # only the second dense variant reuses
    i = calls.index(applied[0])
    # ... after the workspace went back to HEAD, then with the default params restored before its run.
    assert calls[i - 1] == ("dvc", "checkout", "-q") and calls[i + 1] == ("git", "checkout", "--", "params.yaml")
    assert calls[i + 2] == exps[2] and calls[-1] == ("dvc", "checkout", "-q")  # HEAD again at the end
