"""Create one virtualenv per peer loader under benchmarks/peers/.venv-<peer>/, with pins that install here.

Every venv gets the CPU torch 2.13.0 wheel that lies on this machine's disk (pinned through a
constraints file, or pip would download a multi-GB CUDA build). A stamp file records a finished
install (and its spec), so a second run skips ready venvs. A peer that fails is recorded, not fatal.

    python benchmarks/peers/install.py [--peers hf,lance] [--force] [--jobs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
TORCH = "torch==2.13.0"

# pip requirement sets, installed in order; "--no-deps" as the first item of a set applies to that set.
PEERS: dict[str, list[list[str]]] = {
    "hf": [["datasets==5.2.0", "pyarrow==26.0.1", "numpy==2.4.6", "pillow", TORCH]],
    "lance": [["pylance==14.0.2", "pyarrow==26.0.1", "numpy==2.4.6", "pillow", TORCH]],
    # petastorm 0.13.1 breaks on pyarrow >= 15 / numpy 2; pyspark (300 MB) is only needed for its
    # Spark helpers, so the package goes in with --no-deps and its other requirements by hand.
    "petastorm": [
        ["pyarrow==14.0.2", "numpy==1.26.4", "pandas==2.2.3", "dill", "diskcache", "future", "packaging",
         "psutil", "pyzmq", "six", "fsspec", "setuptools>=77.0.3,<81", "pillow", TORCH],
        ["--no-deps", "petastorm==0.13.1"],
    ],
    # mosaicml-streaming requires torchvision, whose only wheel here is a CUDA build that fails to
    # import beside the CPU torch. A stub wheel (see stub_torchvision) satisfies the requirement;
    # streaming.vision imports it, the MDS reader/writer never use it.
    "mosaic": [["@stub-torchvision"], ["mosaicml-streaming==0.13.0", "numpy==2.1.3", "pillow", TORCH]],
    "webdataset": [["webdataset==1.0.2", "numpy==2.4.6", "pillow", TORCH]],
    "ray": [["ray[data]==2.60.0", "pydantic", "pyarrow==26.0.1", "numpy==2.4.6", "pillow", TORCH]],
}


def venv_dir(peer: str) -> str:
    return os.path.join(HERE, f".venv-{peer}")


def venv_python(peer: str) -> str:
    return os.path.join(venv_dir(peer), "bin", "python")


def stub_torchvision(dest: str) -> str:
    """Write a tiny pure-Python 'torchvision' wheel: VisionDataset and to_tensor, nothing else."""
    version = "0.28.0+tgstub"
    files = {
        "torchvision/__init__.py": f'"""TensorGrid benchmark stub: the real wheel here is CUDA-only."""\n'
                                   f'__version__ = "{version}"\nfrom . import datasets, transforms  # noqa\n',
        "torchvision/datasets/__init__.py": "import torch.utils.data\n\n\n"
                                            "class VisionDataset(torch.utils.data.Dataset):\n"
                                            "    def __init__(self, root=None, transforms=None, transform=None,"
                                            " target_transform=None):\n"
                                            "        self.root, self.transform = root, transform\n"
                                            "        self.target_transform = target_transform\n\n\n"
                                            "class CIFAR10(VisionDataset):\n    pass\n",
        "torchvision/transforms/__init__.py": "from . import functional  # noqa\n",
        "torchvision/transforms/functional.py": "import numpy as np\nimport torch\n\n\n"
                                                "def to_tensor(pic):\n"
                                                "    a = np.asarray(pic)\n    a = a[:, :, None] if a.ndim == 2 else a\n"
                                                "    return torch.from_numpy(a.copy()).permute(2, 0, 1).float() / 255\n",
    }
    info = f"torchvision-{version}.dist-info"
    files[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: torchvision\nVersion: {version}\n"
    files[f"{info}/WHEEL"] = "Wheel-Version: 1.0\nGenerator: tensorgrid\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
    path = os.path.join(dest, f"torchvision-{version}-py3-none-any.whl")
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return path


def install(peer: str, force: bool = False) -> dict:
    vdir = venv_dir(peer)
    stamp = os.path.join(vdir, "tg-install.json")
    spec = PEERS[peer]
    if not force and os.path.exists(stamp):
        with open(stamp) as f:
            done = json.load(f)
        if done.get("spec") == spec:  # ready, or failed with this spec before: --force retries
            return {**done, "skipped": True}
    t0 = time.time()
    shutil.rmtree(vdir, ignore_errors=True)
    log = []
    try:
        subprocess.run([sys.executable, "-m", "venv", vdir], check=True, capture_output=True, text=True)
        cons = os.path.join(vdir, "tg-constraints.txt")
        with open(cons, "w") as f:
            f.write(TORCH + "\n")
        pip = [venv_python(peer), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-c", cons]
        for reqs in spec:
            if reqs == ["@stub-torchvision"]:
                reqs = [stub_torchvision(vdir)]
            r = subprocess.run(pip + reqs, capture_output=True, text=True)
            log.append(r.stdout[-2000:] + r.stderr[-2000:])
            if r.returncode:
                lines = [ln for ln in r.stderr.splitlines() if "ERROR" in ln] or r.stderr.splitlines()[-3:]
                raise RuntimeError(f"pip install {' '.join(reqs)}: " + " | ".join(lines)[-600:])
        freeze = subprocess.run([venv_python(peer), "-m", "pip", "freeze"], capture_output=True, text=True).stdout
        status = {"peer": peer, "ok": True, "error": None, "spec": spec, "freeze": freeze.split()}
    except Exception as e:  # noqa: BLE001 - any failure is recorded, the other peers go on
        status = {"peer": peer, "ok": False, "error": str(e)[-800:], "spec": spec}
    status["install_s"] = round(time.time() - t0, 1)
    os.makedirs(vdir, exist_ok=True)
    with open(stamp, "w") as f:
        json.dump(status, f, indent=1)
    with open(os.path.join(vdir, "tg-install.log"), "w") as f:
        f.write("\n".join(log))
    return status


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", default=",".join(PEERS))
    ap.add_argument("--force", action="store_true", help="rebuild venvs even if stamped (ready or failed)")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    peers = [p for p in args.peers.split(",") if p]
    with ThreadPoolExecutor(args.jobs) as ex:
        results = list(ex.map(lambda p: install(p, args.force), peers))
    for r in results:
        state = "ready (skipped)" if r.get("skipped") else ("installed" if r["ok"] else "FAILED")
        print(f"{r['peer']:11s} {state:16s} {r.get('install_s', '')}s {r['error'] or ''}", file=sys.stderr)
    print(json.dumps({r["peer"]: {"ok": r["ok"], "error": r["error"]} for r in results}))


if __name__ == "__main__":
    main()
