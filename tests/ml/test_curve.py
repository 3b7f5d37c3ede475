"""learning_curve on real data (scikit-learn's digits): nested stratified subsets, runs in this process and
on two worker processes, resumed from the runs done, a fitted law, save/load, bad input."""

import os
import signal

import numpy as np
import pytest
import torch

import tensorgrid as tg
from tensorgrid.errors import ArgumentError, CurveFitError, WorkerFailedError
from tensorgrid.ml import curve as curve_module
from tensorgrid.ml.curve import LearningCurve, _nested_order, learning_curve
from tensorgrid.quickstart import digits_frame


def _scaled(batch):
    batch["image"] = batch["image"].float().div_(16).flatten(1)
    return batch


def _trainer(**options):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    return tg.Trainer(net, loss=torch.nn.CrossEntropyLoss(), features="image", label="label", transform=_scaled,
                      optimizer=lambda p: torch.optim.Adam(p, lr=1e-2), batch_size=32, epochs=6, quiet=True,
                      **options)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    frame = digits_frame().sample(frac=1.0, random_state=0).reset_index(drop=True)
    root = tmp_path_factory.mktemp("curve")
    return tg.write(str(root / "train"), frame.iloc[:1200]), tg.write(str(root / "val"), frame.iloc[1200:])


def test_every_prefix_of_the_order_is_stratified_and_nested():
    labels = np.repeat(np.arange(4), [100, 50, 30, 20])
    order = _nested_order(labels, seed=3)
    assert sorted(order) == list(range(200))
    for m in (20, 40, 100):
        counts = np.bincount(labels[order[:m]], minlength=4)
        assert np.all(np.abs(counts - m * np.array([100, 50, 30, 20]) / 200) <= 1.0)


def test_a_trainer_rebuilt_the_same_way_finds_the_same_work_folder(digits, tmp_path):
    train, val = digits
    same = [curve_module._work_folder(str(tmp_path), _trainer(), train, val, [60, 120], 2, 0) for _ in range(2)]
    assert same[0] == same[1]  # torch pickles a tensor under its address: the key reads its content instead
    t = _trainer()
    with torch.no_grad():
        t.model[0].weight[0, 0] += 1e-3
    assert curve_module._work_folder(str(tmp_path), t, train, val, [60, 120], 2, 0) != same[0]
    assert curve_module._work_folder(str(tmp_path), _trainer(), train, val, [60, 120], 2, 1) != same[0]


def test_a_script_run_again_finds_its_work_folder(tmp_path):
    """The work folder's key in a new process: a model class, a transform and a metric defined in the
    script (pickled by value: cloudpickle adds a random id per class), string sets (hashing is randomised
    per process); a changed constant the model reads gives another key."""
    import subprocess
    import sys

    script = tmp_path / "curve_key.py"
    script.write_text(
        "import torch\nimport tensorgrid as tg\nfrom tensorgrid.ml.digest import stable_digest\n"
        "LIMIT = 3\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.fc = torch.nn.Linear(4, 2)\n"
        "    def forward(self, x):\n        return self.fc(x).clamp(max=LIMIT)\n"
        "def scaled(b):\n    b['x'] = b['x'].float() / 16\n    return b\n"
        "torch.manual_seed(0)\n"
        "t = tg.Trainer(Net(), loss=torch.nn.CrossEntropyLoss(), features='x', label='y', transform=scaled,\n"
        "               optimizer=lambda p: torch.optim.Adam(p, lr=1e-2), epochs=2, quiet=True)\n"
        "key = lambda: stable_digest(t, {'a', 'b', 'c'}, lambda pred, label: 0.5)\n"
        "print(key())\nLIMIT = 4\nprint(key())\n")
    keys = [subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout.split() for seed in ("1", "2")]
    assert keys[0] == keys[1] and keys[0][0] != keys[0][1]


def test_an_importable_function_whose_code_changed_is_another_key(tmp_path, monkeypatch):
    """pickle names an importable function only: a bug fixed in the user's module must still be new work."""
    import importlib

    from tensorgrid.ml.digest import stable_digest

    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "user_transforms.py").write_text("def scaled(b):\n    return b * 2\n")
    module = importlib.import_module("user_transforms")
    before = stable_digest(module.scaled)
    (tmp_path / "user_transforms.py").write_text("def scaled(b):\n    return b * 3\n")
    importlib.reload(module)
    assert stable_digest(module.scaled) != before


def test_a_curve_on_digits_falls_fits_resumes_and_saves(digits, tmp_path, monkeypatch):
    train, val = digits
    work = str(tmp_path / "work")
    sizes = [60, 120, 240, 480, 960]
    curve = learning_curve(_trainer(), train, val, sizes=sizes, repeats=2, work_dir=work)
    t = curve.table
    assert t["size"].tolist() == sizes and t["n_runs"].tolist() == [2] * 5
    assert t["error_mean"].iloc[-1] < t["error_mean"].iloc[0]
    assert curve.law is not None, curve.refused
    assert curve.law.beta < 0 and curve.predict(1200)[0] < t["error_mean"].iloc[-1] + 0.02
    (folder,) = os.listdir(work)
    os.remove(os.path.join(work, folder, "run-960-1.json"))  # as if stopped before its last run
    monkeypatch.setattr(curve_module.jobs, "can_fork", lambda *a: False)  # where forking is not safe: the local engine
    again = learning_curve(_trainer(), train, val, sizes=sizes, repeats=2, work_dir=work, parallel=2)
    assert again.runs.drop(index=9).equals(curve.runs.drop(index=9))  # 9 runs read back, one run again
    assert abs(again.runs["error"].iloc[9] - curve.runs["error"].iloc[9]) < 0.05
    curve.save(str(tmp_path / "c.json"))
    back = LearningCurve.load(str(tmp_path / "c.json"))
    assert back.table.equals(curve.table) and back.predict(1200) == curve.predict(1200)


def test_parallel_runs_go_to_forked_children_and_a_killed_child_loses_no_finished_run(digits, tmp_path):
    train, val = digits
    calls, kill, work = tmp_path / "calls", tmp_path / "kill", str(tmp_path / "work")
    calls.mkdir()

    def metric(pred, label):  # the error, and who measured it; the third run's worker dies if asked to
        (calls / f"{os.getpid()}-{os.getppid()}-{len(os.listdir(calls))}").touch()
        if kill.exists() and len(os.listdir(calls)) >= 3:
            try:
                kill.unlink()
            except FileNotFoundError:
                pass
            else:
                os.kill(os.getpid(), signal.SIGKILL)
        return 1.0 - tg.ml.evaluate.accuracy(pred, label_col=label)

    sizes = [60, 120, 240, 480]
    assert curve_module.jobs.can_fork(2, train, val), "a test before this one left Ray or a Flight client running"
    kill.touch()
    with pytest.raises(WorkerFailedError, match="learning curve: worker . was killed by SIGKILL.*run it again to resume"):
        learning_curve(_trainer(), train, val, sizes=sizes, repeats=2, parallel=2, metric=metric, work_dir=work)
    (folder,) = os.listdir(work)
    kept = {f: os.stat(os.path.join(work, folder, f)).st_mtime_ns for f in os.listdir(os.path.join(work, folder))}
    assert 1 <= len(kept) < 8  # one child killed itself; the other was stopped, maybe mid-run
    curve = learning_curve(_trainer(), train, val, sizes=sizes, repeats=2, parallel=2, metric=metric, work_dir=work)
    assert curve.table["n_runs"].tolist() == [2] * 4 and curve.law is not None
    assert all(os.stat(os.path.join(work, folder, f)).st_mtime_ns == t for f, t in kept.items())  # not run again
    # 8 runs measured once each, the one killed mid-measure, and at most one the other child had measured
    # but not yet written when it was stopped
    assert 8 + 1 <= len(os.listdir(calls)) <= 8 + 2
    workers = {name.split("-")[0] for name in os.listdir(calls)}
    assert len(workers) >= 3 and {name.split("-")[1] for name in os.listdir(calls)} == {str(os.getpid())}

    with pytest.raises(ArgumentError, match="the metric returned 'x'"):  # a child's error comes back as itself
        learning_curve(_trainer(), train, val, sizes=sizes, repeats=1, parallel=2, work_dir=work,
                       metric=lambda pred, label: "x")


@pytest.mark.parametrize("engine", ["ray", "spark"])
def test_a_trainer_on_ray_or_spark_runs_several_runs_at_once_on_the_cluster(digits, tmp_path, engine, request):
    request.getfixturevalue("ray_cluster" if engine == "ray" else "spark")
    train, val = digits
    calls = tmp_path / "calls"
    calls.mkdir()

    def metric(pred, label):
        (calls / f"{os.getpid()}-{len(os.listdir(calls))}").touch()
        return 1.0 - tg.ml.evaluate.accuracy(pred, label_col=label)

    sizes = [60, 120, 240, 480]
    curve = learning_curve(_trainer(engine=engine), train, val, sizes=sizes, repeats=2, parallel=2, metric=metric,
                           work_dir=str(tmp_path / "work"))
    assert curve.table["n_runs"].tolist() == [2] * 4 and curve.law is not None
    assert curve.table["error_mean"].iloc[-1] < curve.table["error_mean"].iloc[0]
    pids = {name.split("-")[0] for name in os.listdir(calls)}
    assert len(os.listdir(calls)) == 8 and len(pids) == 2 and str(os.getpid()) not in pids  # 2 cluster workers
    with pytest.raises(ArgumentError, match="the metric returned 'x'"):  # a worker's error comes back as itself
        learning_curve(_trainer(engine=engine), train, val, sizes=sizes, repeats=1, parallel=2,
                       work_dir=str(tmp_path / "work"), metric=lambda pred, label: "x")
    with pytest.raises(tg.errors.UnsupportedURLError, match="memory://"):
        learning_curve(_trainer(engine=engine), train, val, sizes=sizes, parallel=2, work_dir="memory://curves")


def test_bad_input_is_refused_before_any_run(digits, tmp_path):
    train, val = digits
    cases = [(dict(val=train), ArgumentError, "shares rows"),
             (dict(sizes=[100, 200, 400]), CurveFitError, "at least 4"),
             (dict(sizes=[100, 200, 400, 5000]), ArgumentError, "training rows \\(1200\\)"),
             (dict(label="nope"), ArgumentError, "no label column 'nope'"),
             (dict(trainer=None), ArgumentError, "trainer must be a tg.Trainer or an estimator")]
    for changes, error, message in cases:
        args = {**dict(trainer=_trainer(), train=train, val=val, work_dir=str(tmp_path)), **changes}
        with pytest.raises(error, match=message):
            learning_curve(**args)
    assert not os.listdir(tmp_path)


def test_plot_regions_and_what_more_data_buys(tmp_path):
    from tensorgrid.ml.powerlaw import fit_power_law

    sizes = [50, 100, 200, 400, 800, 1600]
    rng = np.random.default_rng(0)
    errors = [list(np.minimum(0.9, 6 * m ** -0.5 + 0.01) * np.exp(rng.normal(0, 0.02, 3))) for m in sizes]
    runs = [{"size": m, "repeat": r, "error": e} for m, es in zip(sizes, errors) for r, e in enumerate(es)]
    import pandas as pd

    curve = LearningCurve(pd.DataFrame(runs), fit_power_law(sizes, errors))
    assert curve.regions["small_data"] == curve.law.small_data and curve.regions["power_law"]
    r = curve.roi(cost_per_row=0.001, value_per_point=100.0)
    assert r["rows_later"] == 16_000 and 0 < r["points_gained"] < 100 * r["error_now"]
    assert r["net"] == pytest.approx(r["value"] - r["cost"]) and "10x the data" in r["summary"]
    png = curve.plot(str(tmp_path / "curve.png"), target_error=0.05)
    from PIL import Image

    with Image.open(png) as im:
        assert im.size[0] > 600 and im.size[1] > 400
    assert (tmp_path / "curve.png").stat().st_size > 20_000


def test_other_metrics_overlapping_rows_and_a_refused_fit_warn_or_refuse(digits, tmp_path):
    train, val = digits
    sizes = [60, 120, 240, 480]
    loss = learning_curve(_trainer(), train, val, sizes=sizes, repeats=1, metric="log_loss", work_dir=str(tmp_path))
    assert loss.table["error_mean"].iloc[-1] < loss.table["error_mean"].iloc[0]
    with pytest.warns(RuntimeWarning, match="no power law fitted"):  # a flat metric: no power law
        custom = learning_curve(_trainer(), train, val, sizes=sizes, repeats=1, work_dir=str(tmp_path),
                                metric=lambda pred, label: 0.3)
    assert custom.law is None and "does not fall" in custom.refused
    with pytest.raises(CurveFitError, match="no power law was fitted"):
        custom.predict(1000)
    a, b = train.split([0.7, 0.3], seed=0)
    with pytest.raises(ArgumentError, match="shares rows"):
        learning_curve(_trainer(), a, train, sizes=sizes, work_dir=str(tmp_path))
    assert learning_curve(_trainer(), a, b, sizes=[60, 120, 240, 480], repeats=1, work_dir=str(tmp_path)).law


def test_the_cli_prints_the_table_and_the_fit_and_writes_the_plot(digits, tmp_path):
    import subprocess
    import sys

    train, val = digits
    maker = tmp_path / "make.py"
    maker.write_text(
        "import torch\nimport tensorgrid as tg\n\n"
        "def scaled(b):\n    b['image'] = b['image'].float().div_(16).flatten(1)\n    return b\n\n"
        "def make_trainer():\n    torch.manual_seed(0)\n"
        "    net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))\n"
        "    return tg.Trainer(net, loss=torch.nn.CrossEntropyLoss(), features='image', label='label',\n"
        "                      transform=scaled, optimizer=lambda p: torch.optim.Adam(p, lr=1e-2), epochs=6, quiet=True)\n\n"
        "if __name__ == '__main__':\n    raise SystemExit('not run by the CLI')\n")
    cli = [sys.executable, "-m", "tensorgrid.cli", "curve", "--data", train.url, "--val", val.url]
    done = subprocess.run(cli + ["--trainer", f"{maker}:make_trainer", "--sizes", "60,120,240,480", "--repeats", "2",
                                 "--parallel", "2", "--png", str(tmp_path / "c.png"), "--work-dir",
                                 str(tmp_path / "w")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "error_mean" in done.stdout and "LearningCurve(8 runs" in done.stdout and "plot: " in done.stdout
    assert (tmp_path / "c.png").stat().st_size > 10_000
    for bad, message in (([f"{maker}:nope"], "defines no function 'nope'"), (["missing.py:f"], "no such file"),
                         ([f"{maker}:make_trainer", "--sizes", "a,b"], "--sizes")):
        done = subprocess.run(cli + ["--trainer", *bad], capture_output=True, text=True, timeout=120)
        assert done.returncode == 1 and message in done.stderr and "Traceback" not in done.stderr
