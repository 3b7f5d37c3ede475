"""Mixed precision: the forward pass and loss under ``torch.autocast`` (bf16 on CPU and CUDA, fp16 on CUDA with
a ``GradScaler`` whose state goes into checkpoints); "fp32" changes nothing."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from ..errors import TrainingConfigError

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
FP16_NEEDS_CUDA = ("precision='fp16' needs CUDA devices (float16 training needs a loss scaler, which runs on "
                   "CUDA only here); on CPUs use precision='bf16'")


class Precision:
    """How one rank computes: autocast around forward and loss, the scaler around backward and step."""

    def __init__(self, name: str, device: torch.device):
        if name == "fp16" and device.type != "cuda":
            raise TrainingConfigError(FP16_NEEDS_CUDA)
        self.name, self.device = name, device
        self.dtype = _DTYPES.get(name)
        self.scaler = torch.amp.GradScaler("cuda") if name == "fp16" else None

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype) if self.dtype is not None else nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Gradients back to their true size (before clipping them)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
        else:  # skips the step when a gradient overflowed, and adapts the scale
            self.scaler.step(optimizer)
            self.scaler.update()

    def state_dict(self) -> dict | None:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: dict | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
