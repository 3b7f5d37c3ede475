"""Pretrained weights from a file the test makes, over a path, memory:// and a real HTTP server."""

import functools
import http.server
import threading

import pytest
import torch

import tensorgrid as tg
from tensorgrid.errors import ModelLoadError
from tensorgrid.ml import load_weights


def _net(out=5):
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, out))


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.fixture
def http_root(tmp_path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_a_state_dict_loads_from_a_path_memory_and_http(tmp_path, http_root):
    torch.manual_seed(1)
    trained = _net()
    torch.save(trained.state_dict(), tmp_path / "w.pt")
    fs, _ = tg.fs.resolve("memory://w/ddp.pt")
    ddp = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in trained.state_dict().items()}}
    with fs.open("memory://w/ddp.pt", "wb") as f:
        torch.save(ddp, f)
    for url in (str(tmp_path / "w.pt"), f"{http_root}/w.pt", "memory://w/ddp.pt"):
        torch.manual_seed(2)
        fresh = _net()
        assert not _same(fresh, trained)
        assert load_weights(fresh, url) is fresh and _same(fresh, trained)


def test_a_new_head_loads_the_backbone_only_with_strict_false(tmp_path):
    trained = _net()
    torch.save({"model": trained.state_dict()}, tmp_path / "ckpt.pt")  # a checkpoint's layout
    backbone_plus_head = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU())
    backbone_plus_head.add_module("head", torch.nn.Linear(16, 3))
    with pytest.raises(ModelLoadError, match="missing.*head.weight.*unexpected.*2.weight"):
        load_weights(backbone_plus_head, tmp_path / "ckpt.pt")
    load_weights(backbone_plus_head, tmp_path / "ckpt.pt", strict=False)
    assert torch.equal(backbone_plus_head[0].weight, trained[0].weight)


def test_files_that_do_not_fit_are_named_errors(tmp_path, http_root):
    torch.save(_net(out=7).state_dict(), tmp_path / "seven.pt")
    with pytest.raises(ModelLoadError, match=r"seven.pt.*2.weight \(7, 16\).*\(5, 16\)"):
        load_weights(_net(), tmp_path / "seven.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a state dict")
    torch.save({"a": 1}, tmp_path / "plain.pt")
    cases = {str(tmp_path / "junk.pt"): "not a state dict", str(tmp_path / "missing.pt"): "no such weights file",
             str(tmp_path / "plain.pt"): "holds no state dict", f"{http_root}/gone.pt": "cannot be downloaded"}
    for url, message in cases.items():
        with pytest.raises(ModelLoadError, match=message):
            load_weights(_net(), url)
    torch.save({"x.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ModelLoadError, match="no tensor name matches"):
        load_weights(_net(), tmp_path / "other.pt", strict=False)


def test_a_trainer_checkpoint_loads_as_weights(tmp_path):
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    ds = tg.write(str(tmp_path / "d"), pd.DataFrame({"x": list(rng.random((64, 8), dtype=np.float32)),
                                                     "label": rng.integers(0, 5, 64)}))
    result = tg.Trainer(_net(), loss=torch.nn.CrossEntropyLoss(), features="x", label="label", epochs=1, quiet=True,
                        checkpoint_dir=str(tmp_path / "ckpt")).fit(ds)
    path = tg.train.checkpoint.latest(str(tmp_path / "ckpt"))
    fresh = load_weights(_net(), path)
    assert _same(fresh, result.model)
