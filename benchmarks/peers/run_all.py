"""Install the peers, generate the source data, run every peer on every figure, print a table.

    .venv/bin/python benchmarks/peers/run_all.py --data benchmarks/_data/peers \\
        --figures rows1mb,records100,mnist,jpeg64 [--peers hf,lance] [--rows records100=200000] [--json out.json]

Runs in the main venv; each peer runs in its own venv (run_peer.py), one subprocess per
(figure, peer, workers), bounded by --timeout. Results are written to --json after every run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import datagen  # noqa: E402
import install  # noqa: E402

PEERS = ["files", "hf", "lance", "petastorm", "mosaic", "webdataset", "ray"]
NO_WORKERS = {"ray"}  # Ray schedules its own tasks; the DataLoader-worker sweep does not apply


def variants(peer: str, figure: str) -> list[str]:
    if peer == "hf":
        return ["hf"] if figure == "rows1mb" else ["hf-map", "hf-iterable"]
    return [peer]


def python_for(peer: str) -> str:
    return sys.executable if peer == "files" else install.venv_python(peer)


def run_one(variant: str, peer: str, figure: str, data: str, workers: int, timeout: float) -> dict:
    cmd = [python_for(peer), os.path.join(HERE, "run_peer.py"), variant, figure, "--data", data,
           "--workers", str(workers)]
    log = os.path.join(data, "logs", f"{variant}-{figure}-w{workers}.log")
    os.makedirs(os.path.dirname(log), exist_ok=True)
    base = {"peer": variant, "figure": figure, "workers": workers, "rows": None, "rows_per_s": None,
            "gb_per_s": None, "first_batch_s": None, "note": ""}
    t0 = time.time()
    with open(log, "w") as err:
        try:
            p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, timeout=timeout,
                               start_new_session=True)
        except subprocess.TimeoutExpired:
            return {**base, "error": f"timeout after {timeout:.0f}s (log: {log})"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return {**base, "error": f"exit {p.returncode}, no JSON line (log: {log})"}
    out = json.loads(lines[-1])
    out["wall_s"] = round(time.time() - t0, 1)
    return out


def table(results: list[dict]) -> str:
    rows = ["| figure | peer | workers | rows/s | GB/s | first batch s | note / error |", "|---|---|---|---|---|---|---|"]
    for r in results:

        def num(k: str, f: str, r: dict = r) -> str:
            return f.format(r[k]) if r.get(k) is not None else "-"

        text = f"ERROR: {r['error']}" if r.get("error") else r.get("note", "")
        rows.append(f"| {r['figure']} | {r['peer']} | {r['workers']} | {num('rows_per_s', '{:,}')} | "
                    f"{num('gb_per_s', '{:.3f}')} | {num('first_batch_s', '{:.3f}')} | {text.replace('|', '/')} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.path.join(os.path.dirname(HERE), "_data", "peers"))
    ap.add_argument("--figures", default=",".join(datagen.FIGURES))
    ap.add_argument("--peers", default=",".join(PEERS))
    ap.add_argument("--rows", help="datagen overrides, e.g. rows1mb=200,records100=200000")
    ap.add_argument("--jpeg-workers", default="0,1,2")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per run_peer call")
    ap.add_argument("--json", help="write all results here")
    args = ap.parse_args()
    data = os.path.abspath(args.data)
    peers = args.peers.split(",")
    figures = args.figures.split(",")

    venv_peers = [p for p in peers if p != "files"]
    installed = {p: install.install(p) for p in venv_peers}
    for p, s in installed.items():
        print(f"install {p}: {'ok' if s['ok'] else 'FAILED ' + s['error']}", file=sys.stderr)
    rows = datagen.parse_rows(args.rows)
    for fig in figures:
        datagen.generate(data, fig, rows.get(fig))

    results = []
    for fig in figures:
        for peer in peers:
            sweep = [int(w) for w in args.jpeg_workers.split(",")] if fig == "jpeg64" and peer not in NO_WORKERS else [0]
            for variant in variants(peer, fig):
                for w in sweep:
                    if peer != "files" and not installed[peer]["ok"]:
                        r = {"peer": variant, "figure": fig, "workers": w, "error": "install failed: "
                             + installed[peer]["error"][:200]}
                    else:
                        r = run_one(variant, peer, fig, data, w, args.timeout)
                    results.append(r)
                    print(json.dumps(r), file=sys.stderr, flush=True)
                    if args.json:
                        with open(args.json, "w") as f:
                            json.dump(results, f, indent=1)
    print(table(results))


if __name__ == "__main__":
    main()
