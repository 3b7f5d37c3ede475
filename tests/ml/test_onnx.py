"""ONNX models through onnxruntime: a torch model exported to ONNX gives the torch model's outputs, in
predict too; it pickles for worker processes; a file that does not load is a ModelLoadError naming it."""

import sys
import warnings

import cloudpickle
import fsspec
import numpy as np
import pandas as pd
import pytest
import torch

pytest.importorskip("onnxruntime")

import tensorgrid as tg  # noqa: E402
from tensorgrid.errors import ModelLoadError  # noqa: E402
from tensorgrid.ml.onnx import OnnxModule, load  # noqa: E402
from tensorgrid.train.predict import predict  # noqa: E402


def _cnn():
    torch.manual_seed(0)
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(8 * 16, 5)).eval()


def _export(model, inputs, path, names=("x",)):
    """torch's TorchScript-based exporter (needs only the onnx package); a dynamic batch axis."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the default (dynamo) exporter needs onnxscript
        torch.onnx.export(model, inputs, str(path), dynamo=False, input_names=list(names), output_names=["y"],
                          dynamic_axes={**{n: {0: "batch"} for n in names}, "y": {0: "batch"}})
    return str(path)


@pytest.fixture(scope="module")
def cnn_file(tmp_path_factory):
    return _export(_cnn(), (torch.randn(2, 1, 8, 8),), tmp_path_factory.mktemp("onnx") / "cnn.onnx")


def test_outputs_equal_the_torch_models_for_any_batch_size(cnn_file):
    model, module = _cnn(), load(cnn_file)
    for rows in (1, 7, 64):
        x = torch.randn(rows, 1, 8, 8)
        with torch.no_grad():
            want = model(x).numpy()
        np.testing.assert_allclose(module(x).numpy(), want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(module(x.double()).numpy(), want, rtol=1e-5, atol=1e-6)  # cast to float32


def test_predict_with_the_onnx_file_matches_predict_with_the_torch_model(cnn_file, tmp_path):
    rng = np.random.default_rng(0)
    images = rng.standard_normal((300, 1, 8, 8)).astype(np.float32)
    ds = tg.write(str(tmp_path / "d"), pd.DataFrame({"x": list(images), "id": np.arange(300)}))
    onnx = predict(OnnxModule(cnn_file), ds, features="x", classifier=True, batch_size=64).to_pandas()
    torch_ = predict(_cnn(), ds, features="x", classifier=True, batch_size=64).to_pandas()
    assert list(onnx.columns) == ["id", "prediction", "probability"]
    np.testing.assert_array_equal(onnx["id"], np.arange(300))
    np.testing.assert_array_equal(onnx["prediction"], torch_["prediction"])
    np.testing.assert_allclose(np.stack(onnx["probability"]), np.stack(torch_["probability"]), rtol=1e-5, atol=1e-6)


def test_pickles_as_the_files_bytes_and_runs_after_unpickling(cnn_file):
    module = OnnxModule(cnn_file)
    again = cloudpickle.loads(cloudpickle.dumps(module))
    assert again._session is None  # rebuilt on first use
    x = torch.randn(3, 1, 8, 8)
    np.testing.assert_array_equal(again(x).numpy(), module(x).numpy())
    assert not again.eval().training and again.train().training and list(again.parameters()) == []


def test_reads_from_any_fsspec_url(cnn_file):
    url = "memory://tg-onnx-test/cnn.onnx"
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/tg-onnx-test/cnn.onnx", open(cnn_file, "rb").read())
    try:
        x = torch.randn(2, 1, 8, 8)
        np.testing.assert_array_equal(load(url)(x).numpy(), load(cnn_file)(x).numpy())
    finally:
        fs.rm("/tg-onnx-test", recursive=True)


def test_a_file_that_does_not_load_is_a_model_load_error_naming_it(tmp_path, monkeypatch):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model at all " * 20)
    with pytest.raises(ModelLoadError, match=r"garbage\.onnx: not an ONNX model onnxruntime loads"):
        load(garbage)
    with pytest.raises(ModelLoadError, match=r"missing\.onnx: no such ONNX file"):
        load(tmp_path / "missing.onnx")
    two = _export(_Add(), (torch.ones(2, 3), torch.ones(2, 3)), tmp_path / "two.onnx", names=("a", "b"))
    with pytest.raises(ModelLoadError, match=r"two\.onnx: the model must take one input, it takes 2: \['a', 'b'\]"):
        load(two)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    with pytest.raises(ModelLoadError, match=r"garbage\.onnx: .*pip install 'tensorgrid\[onnx\]'"):
        load(garbage)


class _Add(torch.nn.Module):
    def forward(self, a, b):
        return a + b


def test_a_batch_of_another_shape_is_a_model_input_error(cnn_file, tmp_path):
    from tensorgrid.errors import ModelInputError
    from tensorgrid.ml import NNModel

    with pytest.raises(ModelInputError, match=r"cnn.onnx.*\(4, 1, 7, 7\)"):
        load(cnn_file)(torch.randn(4, 1, 7, 7))
    ds = tg.write(str(tmp_path / "d"), pd.DataFrame({"x": list(np.zeros((10, 3, 8, 8), np.float32))}))
    with pytest.raises(ModelInputError, match=r"\(10, 3, 8, 8\)"):  # 3 channels for a 1-channel model
        NNModel(cnn_file, features_col="x").transform(ds)
