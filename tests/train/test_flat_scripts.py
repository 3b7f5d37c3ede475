"""Training scripts as users write them: flat (no ``if __name__ == "__main__"`` guard), piped on stdin, code
run with no file at all (as a notebook cell), with the model, a transform and a callback defined in
``__main__``, on 2 local workers, on Ray and on Spark. Each runs as a real separate Python process."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

PY = sys.executable
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# a flat script: everything at module level, the model from a module next to the script, the rest in __main__
SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np, pyarrow as pa, torch
    import tensorgrid as tg
    from mymodels import Net

    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 8)).astype("float32")
    ds = tg.from_arrow(pa.table({"features": list(x), "label": (x[:, 0] > 0).astype("int64")}))

    class Seen(tg.Callback):
        def __init__(self):
            self.epochs = []

        def on_epoch_end(self, state):
            self.epochs.append(state.epoch)

    def make_net():
        return Net(8)

    seen = Seen()
    trainer = tg.Trainer(model=make_net, loss=torch.nn.CrossEntropyLoss(), batch_size=64, epochs=2, workers=2,
                         engine=ENGINE, transform=lambda b: {**b, "features": b["features"] * 2.0},
                         loader_workers=LOADER_WORKERS, callbacks=[seen], quiet=True, timeout_s=60)
    result = trainer.fit(ds)
    print("TRAINED", len(result.history), len(seen.epochs), flush=True)
""")

MODELS = textwrap.dedent("""
    import torch

    class Net(torch.nn.Module):
        def __init__(self, n):
            super().__init__()
            self.layer = torch.nn.Linear(n, 2)

        def forward(self, x):
            return self.layer(x)
""")


def _script(tmp_path, engine="local", loader_workers=0, before=""):
    (tmp_path / "mymodels.py").write_text(MODELS)
    code = before + SCRIPT.replace("ENGINE", repr(engine)).replace("LOADER_WORKERS", str(loader_workers))
    path = tmp_path / "train_flat.py"
    path.write_text(code)
    return path, code


def _env(**extra):
    # as a user's shell: not the test session's Ray cluster (RAY_ADDRESS), ranks or pytest variables
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTEST", "RANK", "WORLD_SIZE", "MASTER_", "RAY_ADDRESS"))}
    env.pop("PYSPARK_PYTHON", None)  # as in a user's shell: the tests' own session set it
    env["SPARK_LOCAL_IP"] = "127.0.0.1"
    return {**env, **extra}


def _run(args, cwd, stdin=None, timeout=240, **env):
    t0 = time.time()
    p = subprocess.run(args, cwd=cwd, input=stdin, capture_output=True, text=True, timeout=timeout, env=_env(**env))
    return p, time.time() - t0


def _trained(p) -> bool:
    return p.returncode == 0 and "TRAINED 2 2" in p.stdout


def test_flat_piped_and_file_less_scripts_train_on_two_local_workers(tmp_path):
    path, code = _script(tmp_path, loader_workers=1)
    flat, _ = _run([PY, str(path)], tmp_path)
    assert _trained(flat), flat.stderr[-3000:]
    # piped: `python - < script` (no file to re-run; multiprocessing's spawn failed with '<stdin>')
    piped, _ = _run([PY, "-"], tmp_path, stdin=code)
    assert _trained(piped), piped.stderr[-3000:]
    # no file at all, as a notebook cell or `python -c`: __main__ has no __file__
    cell, _ = _run([PY, "-c", code], tmp_path)
    assert _trained(cell), cell.stderr[-3000:]


def test_flat_script_on_ray_with_spawned_loader_workers(tmp_path):
    pytest.importorskip("ray")
    # Ray's workers run their own __main__: functions, classes and lambdas of the user's travel by value, also
    # into the loader's spawned worker processes inside each Ray worker
    path, _ = _script(tmp_path, engine="ray", loader_workers=1,
                      before="import ray\nray.init(address='local', num_cpus=2, include_dashboard=False, _node_ip_address='127.0.0.1')\n")
    p, _ = _run([PY, str(path)], tmp_path)
    assert _trained(p), p.stderr[-3000:]


def test_spark_with_no_session_starts_a_local_one_and_a_wrong_interpreter_is_explained(tmp_path):
    pytest.importorskip("pyspark")
    path, _ = _script(tmp_path, engine="spark")
    p, _ = _run([PY, str(path)], tmp_path)
    assert _trained(p), p.stderr[-3000:]
    assert "no active SparkSession: starting a local one (local[2]" in p.stderr
    # a session whose Python workers cannot import tensorgrid (a virtualenv's Python run without activating
    # it: Spark's workers run another python3) fails within seconds and says what to set
    wrapper = tmp_path / "python-without-site"
    wrapper.write_text(f"#!/bin/sh\nexec {PY} -S \"$@\"\n")  # -S: no site-packages, so no tensorgrid
    wrapper.chmod(0o755)
    session = ("from pyspark.sql import SparkSession\n"
               "SparkSession.builder.master('local[2]').config('spark.ui.enabled', 'false').getOrCreate()"
               ".sparkContext.setLogLevel('ERROR')\n")
    path, _ = _script(tmp_path, engine="spark", before=session)
    p, took = _run([PY, str(path)], tmp_path, PYSPARK_PYTHON=str(wrapper))
    assert p.returncode == 1 and "Traceback" in p.stderr
    # Spark's JVM may still draw its console progress bar ("[Stage 0:> ...]", then spaces and carriage returns
    # to clear it) after our one line: not ours
    lines = [seg.strip() for line in p.stderr.splitlines() for seg in line.split("\r")]
    last = [line for line in lines if line and not line.startswith("[Stage")][-1]
    assert "No module named" in last and f"PYSPARK_PYTHON={PY} before creating the SparkSession" in last, last
    assert took < 120


def test_ctrl_c_stops_every_worker_with_one_line(tmp_path):
    path, _ = _script(tmp_path)
    code = path.read_text().replace("epochs=2", "epochs=500").replace(
        'lambda b: {', 'lambda b: __import__("time").sleep(0.02) or {')
    code = code.replace("quiet=True", "quiet=True, checkpoint_dir='ck', checkpoint_every=1")
    path.write_text(code)
    # a terminal's Ctrl-C: SIGINT to the whole foreground process group (the script and its workers)
    p = subprocess.Popen([PY, str(path)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=_env(), start_new_session=True)
    deadline = time.time() + 120
    while not any((tmp_path / "ck").glob("*.pt")) and time.time() < deadline and p.poll() is None:
        time.sleep(0.2)
    assert p.poll() is None, p.communicate()[1][-3000:]
    os.killpg(p.pid, signal.SIGINT)
    try:
        _, err = p.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        raise AssertionError("Ctrl-C did not stop training within 30 s") from None
    assert p.returncode != 0
    last = err.strip().splitlines()[-1]
    assert last.startswith("KeyboardInterrupt: training interrupted: the 2 workers were stopped (last checkpoint: ")
    assert err.count("Traceback") == 1, err[-3000:]  # the script's own, not one per worker
    assert len(err.strip().splitlines()) < 20, err
    time.sleep(1)
    ps = subprocess.run(["ps", "-eo", "pgid,args"], capture_output=True, text=True).stdout
    assert not [line for line in ps.splitlines() if line.split(None, 1)[0] == str(p.pid)]  # no worker left


def test_the_readme_training_script_runs_as_written(tmp_path):
    """The README's flat training script, copied as a user would, on the digits the usage section writes."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    start = readme.index("# train.py -- python train.py")
    (tmp_path / "train.py").write_text(readme[start:readme.index("```", start)])
    import tensorgrid as tg
    from tensorgrid.quickstart import digits_frame

    tg.write(str(tmp_path / "grid" / "digits"), digits_frame())
    p, _ = _run([PY, "train.py"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
