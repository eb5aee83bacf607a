import importlib.util
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name, rel):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, rel))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quickstart_runs_and_improves_on_the_initial_theta(tmp_path, capsys):
    qs = _load("quickstart", "examples/quickstart.py")
    res, rows = qs.main(["--iters", "4", "--n-train", "4", "--n-test", "4", "--size", "32",
                         "--no-progress", "--out", str(tmp_path), "--task-n-train", "16",
                         "--task-iters", "3", "--task-epochs", "1", "--task-n-test", "64"])
    table = {name: (p, s) for name, p, s in rows}
    assert table["TV, learned θ"][0] > table["TV, initial θ"][0]
    assert res.upper_loss < res.history[0]["upper_loss"]
    for f in ("upper_loss.png", "samples.png", "result.json"):
        assert os.path.getsize(tmp_path / f) > 0
    assert len(json.load(open(tmp_path / "result.json"))["history"]["upper_loss"]) == 4
    assert "PSNR" in capsys.readouterr().out
    task = {name: acc for name, acc, _ in json.load(open(tmp_path / "result.json"))["task_table"]}
    assert set(task) == {"T* on clean digits", "T* on noisy digits", "TV, θ learned for MSE",
                         "TV, θ learned for the task"}
    assert task["T* on clean digits"] > task["T* on noisy digits"]
