"""TensorBoard event files written live to any URL: local paths directly; other URLs through a local
staging folder whose event file is uploaded (whole, atomically) after every flush."""

from __future__ import annotations

import os
import shutil
import tempfile
import time

from torch.utils.tensorboard import SummaryWriter

from .. import fs as tgfs


class TBLog:
    """``purge_step``: a resumed run's first step; TensorBoard hides the events of steps from there on that
    the stopped run wrote (after its last checkpoint), so no step is shown twice."""

    def __init__(self, url: str, flush_secs: float = 5.0, purge_step: int | None = None):
        self.fs, self.root = tgfs.resolve(url)
        self.local = tgfs.is_local(self.fs)
        self.stage = self.root if self.local else tempfile.mkdtemp(prefix="tg-tb-")
        if self.local:
            os.makedirs(self.root, exist_ok=True)
        if purge_step is not None:
            _after_existing_files(self.fs, self.root)
        self.writer = SummaryWriter(self.stage, flush_secs=flush_secs, purge_step=purge_step)
        self.flush_secs = flush_secs
        self._last = time.monotonic()

    def scalars(self, step: int, values: dict) -> None:
        for k, v in values.items():
            if v is not None:
                self.writer.add_scalar(k, float(v), step)
        if time.monotonic() - self._last >= self.flush_secs:
            self.flush()

    def flush(self) -> None:
        self.writer.flush()
        self._last = time.monotonic()
        if not self.local:
            self.fs.makedirs(self.root, exist_ok=True)
            for name in os.listdir(self.stage):
                with open(os.path.join(self.stage, name), "rb") as f:
                    tgfs.put_atomic(self.fs, tgfs.join(self.root, name), f.read())

    def close(self) -> None:
        self.flush()
        self.writer.close()
        if not self.local:
            shutil.rmtree(self.stage, ignore_errors=True)


def _after_existing_files(fs, root: str) -> None:
    """Wait (at most a second) until this second is later than every event file's in ``root``: readers take
    files in name order, which starts with the second the file was made, and the purge must come after the
    events it hides."""
    try:
        names = [tgfs.name(n) for n in fs.ls(root, detail=False)]
    except FileNotFoundError:
        return
    seconds = [int(n.split(".")[3]) for n in names if n.startswith("events.out.tfevents.")
               and n.split(".")[3].isdigit()]
    if seconds and max(seconds) >= int(time.time()):
        time.sleep(max(0.0, max(seconds) + 1 - time.time()))
