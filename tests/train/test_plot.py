"""FitResult.plot: the learning curves of a real run as a PNG (matplotlib's Agg backend, no display)."""

import sys

import pytest
from PIL import Image

import tensorgrid as tg
from tests.train.helpers import trainer


def test_plot_draws_train_and_validation_curves_of_a_run(digits, tmp_path):
    pytest.importorskip("matplotlib")
    result = trainer(epochs=3).fit(digits[0], val=digits[1])
    path = result.plot(str(tmp_path / "sub" / "curves.png"), title="digits")
    assert path == str(tmp_path / "sub" / "curves.png")
    with Image.open(path) as im:  # a real PNG, two panels (loss, accuracy) side by side: wider than tall
        assert im.format == "PNG" and im.width > 2 * im.height > 300
        colours = len(im.convert("RGB").getcolors(maxcolors=1 << 24))
    assert colours > 50  # lines, labels and legends were drawn, not a blank canvas
    assert not list((tmp_path / "sub").glob("*.tmp*"))  # written whole, then renamed


def test_plot_bad_input_and_missing_matplotlib_are_named(digits, tmp_path, monkeypatch):
    result = trainer(epochs=1).fit(digits[0])
    empty = tg.FitResult(result.model, {}, [])
    with pytest.raises(tg.ArgumentError, match="no finished epoch"):
        empty.plot(str(tmp_path / "x.png"))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as when the [plot] extra is not installed
    with pytest.raises(tg.TensorGridError, match=r"pip install 'tensorgrid\[plot\]'"):
        result.plot(str(tmp_path / "x.png"))
    assert not (tmp_path / "x.png").exists()
