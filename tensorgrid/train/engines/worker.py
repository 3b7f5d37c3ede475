"""One local training worker: ``python -m tensorgrid.train.engines.worker JOB RESULT RESTARTED WATCH``.

The local engine starts each worker as a fresh interpreter running this module, not as a multiprocessing
child: nothing re-runs the user's ``__main__`` (a flat script with no ``if __name__ == "__main__"`` guard, a
script piped on stdin, a notebook or the interactive interpreter all train the same). The job travels by
value in the file JOB (cloudpickle: functions, classes and lambdas defined in ``__main__`` included), with
the driver's ``sys.path`` so that the user's own modules import here as they did there. Rank 0 writes its
result to RESULT (written whole, then renamed). Ctrl-C ends a worker quietly: the driver says it in one line.
"""

from __future__ import annotations

import os
import sys


def _load(job_path: str):
    import json

    import cloudpickle

    with open(job_path, "rb") as f:
        driver_path = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        # the driver's import path first (its script's folder, its PYTHONPATH additions), then ours
        sys.path[:] = list(dict.fromkeys([p for p in driver_path if isinstance(p, str)] + sys.path))
        return cloudpickle.load(f)  # streamed from the file: no copy of a payload that may hold the data


def write_job(path: str, payload: bytes) -> None:
    """The job file a worker reads: the driver's ``sys.path`` (JSON, length-prefixed), then the payload."""
    import json

    header = json.dumps([p for p in sys.path if isinstance(p, str)]).encode()
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        f.write(payload)  # apart: a payload holding an in-memory dataset is not copied once more


def _write_result(path: str, out) -> None:
    import cloudpickle

    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        cloudpickle.dump(out, f)
    os.replace(tmp, path)


def main(argv: list[str]) -> int:
    job_path, result_path, restarted, watch_address = argv
    from torch.distributed.elastic.multiprocessing.errors import record

    from ..loop import train
    from ..watch import Reporter

    @record  # an exception is written to the launcher's error file: the driver names it
    def run() -> None:
        rank = int(os.environ["RANK"])
        report = Reporter(watch_address, rank) if watch_address else None
        spec = _load(job_path)
        out = train(spec, rank, int(os.environ["WORLD_SIZE"]), restarted=restarted == "1", report=report)
        if rank == 0 and out is not None:
            _write_result(result_path, out)

    run()
    return 0


def _exit(code: int) -> None:
    """Leave without the interpreter's finalisation, as a multiprocessing child does: native threads still
    running (gloo, Arrow's pools, the loader's) can abort a normal shutdown ("terminate called without an
    active exception"), turning a finished rank into a SIGABRT."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed pipe
            pass
    os._exit(code)


if __name__ == "__main__":
    try:
        code = main(sys.argv[1:])
    except KeyboardInterrupt:  # Ctrl-C reaches every process of the terminal's group: the driver reports it
        code = 130
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - @record wrote the error file; show the traceback too
        import traceback

        traceback.print_exc()
        code = 1
    _exit(code)
