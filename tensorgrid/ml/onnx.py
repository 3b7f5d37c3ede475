"""ONNX models as torch modules: ``OnnxModule`` runs an ONNX file (at any URL) with onnxruntime behind the
``nn.Module`` interface, so ``predict`` and ``NNModel`` take it like any model. onnxruntime is an optional
extra (``pip install 'tensorgrid[onnx]'``), imported only when a model is loaded."""

from __future__ import annotations

import os

import numpy as np
import torch

from ..errors import ModelInputError, ModelLoadError
from ..fs import resolve

INSTALL = "pip install 'tensorgrid[onnx]'"
# ONNX input types -> the numpy dtype fed to onnxruntime
DTYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
          "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16,
          "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_}


class OnnxModule(torch.nn.Module):
    """An ONNX model of one input, run by onnxruntime (CUDA when it offers it, else the CPU); its output is
    the model's first. No parameters: ``predict`` gives it CPU tensors. Pickles as the file's bytes (the
    session is rebuilt on first use, e.g. in a worker process)."""

    def __init__(self, url: str | os.PathLike):
        super().__init__()
        self.url = os.fspath(url)
        self._bytes = _read(self.url)
        self._session = None
        self._open()  # a bad file fails here, in the caller's process, not later in a worker

    def _open(self):
        ort = _onnxruntime(self.url)
        offered = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in offered]
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # the share of cores torch would use here
        try:
            session = ort.InferenceSession(self._bytes, options, providers=providers)
        except Exception as e:  # onnxruntime's own classes (InvalidProtobuf, InvalidGraph, Fail...)
            raise ModelLoadError(f"{self.url}: not an ONNX model onnxruntime loads ({type(e).__name__}: "
                                 f"{e})"[:300]) from None
        inputs = session.get_inputs()
        if len(inputs) != 1:
            raise ModelLoadError(f"{self.url}: the model must take one input, it takes {len(inputs)}: "
                                 f"{[i.name for i in inputs]}")
        if inputs[0].type not in DTYPES:
            raise ModelLoadError(f"{self.url}: input {inputs[0].name!r} of type {inputs[0].type} is not supported; "
                                 f"supported: {sorted(DTYPES)}")
        self._input, self._dtype = inputs[0].name, DTYPES[inputs[0].type]
        self._output = session.get_outputs()[0].name
        self._session = session
        return session

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        session = self._session if self._session is not None else self._open()
        x = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=self._dtype)
        try:
            (y,) = session.run([self._output], {self._input: x})
        except Exception as e:  # noqa: BLE001 - onnxruntime's errors derive from Exception only
            if type(e).__name__ != "InvalidArgument":
                raise
            raise ModelInputError(f"{self.url}: the ONNX model cannot take a batch of {x.shape} {x.dtype}: "
                                  f"{str(e).strip()[:300]}") from None
        return torch.from_numpy(y)

    def extra_repr(self) -> str:
        return repr(self.url)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_session": None}  # an onnxruntime session does not pickle


def load(url: str | os.PathLike) -> OnnxModule:
    """The ONNX model at ``url`` as a module; a file that is missing or not a model (or no onnxruntime)
    raises ``ModelLoadError`` naming it."""
    return OnnxModule(url)


def _onnxruntime(url: str):
    try:
        import onnxruntime
    except ImportError:
        raise ModelLoadError(f"{url}: running an ONNX model needs onnxruntime: {INSTALL}") from None
    return onnxruntime


def _read(url: str) -> bytes:
    _onnxruntime(url)  # the missing runtime is the first thing to say
    fs, path = resolve(url)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise ModelLoadError(f"{url}: no such ONNX file") from None
    except OSError as e:
        raise ModelLoadError(f"{url}: cannot be read ({e})"[:300]) from None
