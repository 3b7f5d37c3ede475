"""The public API: every name in ``tg.__all__`` exists, every ``tg.name`` the README uses is public, and
every public error is listed in the README."""

import pathlib
import re

import tensorgrid as tg

README = (pathlib.Path(__file__).parents[1] / "README.md").read_text()


def test_every_public_name_exists():
    for name in tg.__all__:
        assert getattr(tg, name) is not None, name
    assert set(tg.__all__) <= set(dir(tg))


def test_every_name_the_readme_uses_is_public():
    used = set(re.findall(r"\btg\.([A-Za-z_][A-Za-z0-9_]*)", README))
    assert used and used <= set(tg.__all__), sorted(used - set(tg.__all__))


def test_every_public_error_is_an_exported_tensorgrid_error_listed_in_the_readme():
    errors = {n for n, v in vars(tg.errors).items() if isinstance(v, type) and issubclass(v, Exception)
              and not issubclass(v, Warning) and v.__module__ == "tensorgrid.errors"}
    assert errors <= set(tg.__all__), sorted(errors - set(tg.__all__))
    for name in errors:
        assert issubclass(getattr(tg, name), tg.TensorGridError), name
        assert f"`{name}`" in README, f"{name} is not listed in the README"


def test_dataset_contract_and_read_api():
    for method in ("schema", "shard_rows", "read_shard", "blocks", "read_rows", "bytes_per_row", "is_remote",
                   "cache_key", "fingerprint", "to_torch", "to_arrow", "to_pandas", "head", "sql", "verify",
                   "versions", "shard_urls", "label_names", "split", "select", "filter", "sample"):
        assert hasattr(tg.Dataset, method), method
    assert {"schema", "shard_rows", "read_shard"} == set(tg.Dataset.__abstractmethods__)
    for name in ("decode_image", "resize", "normalize", "to_float", "compose"):
        assert callable(getattr(tg.transforms, name)), name
