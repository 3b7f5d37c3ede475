#!/usr/bin/env python3
"""The README's two commands, on a machine with only Python 3.11 and pip:

    python3 dev.py demo    # creates .venv, installs TensorGrid (+ matplotlib), runs `tensorgrid quickstart`
    python3 dev.py test    # creates .venv with the dev extras, runs the test suite

Also: `python3 dev.py lint`, `python3 dev.py bench [SCRIPT]`. Installs are pinned by constraints.txt
(torch==2.13.0: its CPU wheel is on this kind of machine's disk; a looser pin downloads a CUDA build).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv

ROOT = os.path.dirname(os.path.abspath(__file__))
VENV = os.path.join(ROOT, ".venv")
BIN = os.path.join(VENV, "Scripts" if os.name == "nt" else "bin")
PY = os.path.join(BIN, "python")


def ensure(extras: str) -> None:
    """Create .venv and install the package with ``extras`` unless this exact set-up is already there."""
    digest = hashlib.sha256(extras.encode())
    for name in ("pyproject.toml", "constraints.txt"):
        with open(os.path.join(ROOT, name), "rb") as f:
            digest.update(f.read())
    stamp = os.path.join(VENV, f".installed-{extras or 'core'}-{digest.hexdigest()[:12]}")
    if os.path.exists(stamp):
        return
    if not os.path.exists(PY):
        print(f"creating {VENV}", flush=True)
        venv.create(VENV, with_pip=True)
    target = f".[{extras}]" if extras else "."
    print(f"installing tensorgrid{'[' + extras + ']' if extras else ''} into .venv (first run only)", flush=True)
    subprocess.run([PY, "-m", "pip", "install", "--disable-pip-version-check", "-q",
                    "-c", os.path.join(ROOT, "constraints.txt"), "-e", target], cwd=ROOT, check=True)
    open(stamp, "w").close()


def main(argv: list[str]) -> int:
    cmd, rest = (argv[0], argv[1:]) if argv else ("help", [])
    if cmd == "demo":
        ensure("plot")  # the demo ends with a picture of its learning curves
        return subprocess.call([os.path.join(BIN, "tensorgrid"), "quickstart", *rest], cwd=ROOT)
    if cmd == "test":
        ensure("dev")
        return subprocess.call([PY, "-m", "pytest", *rest], cwd=ROOT)
    if cmd == "lint":
        ensure("dev")
        return subprocess.call([os.path.join(BIN, "ruff"), "check", "tensorgrid", "tests", "benchmarks", "dev.py"],
                               cwd=ROOT)
    if cmd == "bench":
        ensure("dev")
        scripts = rest or sorted(f"benchmarks/{n}" for n in os.listdir(os.path.join(ROOT, "benchmarks"))
                                 if n.startswith("bench_") and n.endswith(".py"))
        return max(subprocess.call([PY, s], cwd=ROOT) for s in scripts)
    print(__doc__)
    return 0 if cmd in ("help", "-h", "--help") else 2


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except subprocess.CalledProcessError as e:
        print(f"error: {' '.join(map(str, e.cmd))} failed with exit code {e.returncode}", file=sys.stderr)
        sys.exit(e.returncode or 1)
