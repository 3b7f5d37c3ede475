"""The shape of the package: layers import downward only, and a process that only stores or queries data
never loads torch or PIL."""

import ast
import json
import os
import pathlib
import subprocess
import sys

import tensorgrid as tg

PKG = pathlib.Path(tg.__file__).parent
# what each layer may import from the package at module level (besides the shared leaf modules)
LEAVES = {"errors", "fs", "args", "cores", "rng", "allocator", "forking"}
ALLOWED = {"store": set(), "loader": {"store"}, "train": {"store", "loader", "transforms"}, "server": {"store"},
           "transforms": set(), "errors": set(), "fs": set(), "args": set(), "cores": set(), "rng": set(),
           "ml": {"store", "loader", "train", "transforms"}}


def _module_level_imports(path: pathlib.Path) -> list[str]:
    """tensorgrid.<top> names imported at module level (not inside functions)."""
    tree = ast.parse(path.read_text())
    rel = path.relative_to(PKG).with_suffix("").parts
    out = []
    for node in tree.body:  # module level only: imports inside functions are deliberate, on-use
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = rel[:len(rel) - node.level]
                target = [*base, *(node.module.split(".") if node.module else [])]
                names = [target[0]] if target else [a.name for a in node.names]
                out += names
            elif node.module and node.module.startswith("tensorgrid."):
                out.append(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out += [a.name.split(".")[1] for a in node.names if a.name.startswith("tensorgrid.")]
    return out


def test_layers_import_downward_only():
    wrong = []
    for path in PKG.rglob("*.py"):
        layer = path.relative_to(PKG).parts[0].removesuffix(".py")
        if layer not in ALLOWED:
            continue
        for target in _module_level_imports(path):
            if target != layer and target not in LEAVES and target not in ALLOWED[layer]:
                wrong.append(f"{path.relative_to(PKG)} imports {target}")
    assert not wrong, wrong


def test_reading_and_querying_data_never_imports_torch_or_pil(tmp_path):
    script = f"""
import sys, json, pyarrow as pa, tensorgrid as tg
ds = tg.write({str(tmp_path / 'd')!r}, pa.table({{"a": [1, 2, 3]}}))
tg.open({str(tmp_path / 'd')!r}).to_arrow()
tg.sql("SELECT sum(a) AS s FROM t", t=ds).to_pandas()
tg.list_datasets({str(tmp_path)!r})
from tensorgrid import cli  # `tensorgrid info` and `tensorgrid cache` too (they read the loader's cache)
cli.main(["info", {str(tmp_path / 'd')!r}]); cli.main(["cache"])
from tensorgrid.server import GridServer  # a grid server and its clients: SQL, datasets, grid:// files
with GridServer({str(tmp_path / 'grid')!r}) as server:
    g = tg.connect(server.url)
    g.sql("CREATE TABLE t AS SELECT 1 AS a"); g.dataset("t").to_arrow()
    import fsspec; fsspec.open(f"grid://127.0.0.1:{{server.port}}/x.txt", "w").open().close()
print(json.dumps([m for m in ("torch", "PIL", "sklearn", "tensorboard") if m in sys.modules]))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env={**os.environ, "TENSORGRID_CACHE_DIR": str(tmp_path / "cache")})
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_torch_side_names_load_on_first_use():
    out = subprocess.run([sys.executable, "-c", "import sys, tensorgrid as tg; a = 'torch' in sys.modules; "
                          "tg.Trainer; print(a, 'torch' in sys.modules, tg.transforms.to_float.__name__)"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True", "to_float"]
