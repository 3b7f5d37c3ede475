"""The ML examples run as users run them: flat scripts (no __main__ guard), in a fresh interpreter."""

import pathlib
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize("script, expect", [
    ("transfer_learning.py", "frozen pretrained backbone + head: accuracy 0.9"),
    ("images_folder.py", "confusion matrix: "),
    ("learning_curve.py", "measured at 1,200 rows: 0.0"),  # it asserts the prediction's interval holds it
])
def test_example_runs_as_a_flat_script(script, expect, tmp_path):
    done = subprocess.run([sys.executable, str(EXAMPLES / script)], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert expect in done.stdout, done.stdout
