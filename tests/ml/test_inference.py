"""NNModel.transform in parts: parallel on the local engine, resumable after a crash (an exception, a worker
killed with SIGKILL), one committed version whose rows equal a one-pass prediction."""

import glob
import os
import signal

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tensorgrid as tg
from tensorgrid.errors import DatasetExistsError, ModelLoadError, WorkerFailedError
from tensorgrid.ml import NNModel, inference
from tensorgrid.ml.inference import MAX_PARTS, PART_BYTES, PART_ROWS, TAIL_SPLIT, parts_of
from tensorgrid.quickstart import digits_frame


def _to_float(batch):
    batch["image"] = batch["image"].float().div_(255).flatten(1)
    return batch


class FailOnce:
    """A transform that fails once on the batch holding row ``row`` while ``flag`` exists: by raising, or
    by killing its own process with SIGKILL (a worker lost for real)."""

    def __init__(self, flag, row, kill=False):
        self.flag, self.row, self.kill = str(flag), row, kill

    def __call__(self, batch):
        if bool((batch["id"] == self.row).any()) and os.path.exists(self.flag):
            os.remove(self.flag)
            if self.kill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"row {self.row} failed")
        return _to_float(batch)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    frame = digits_frame().iloc[:1000].reset_index(drop=True)
    frame.insert(0, "id", np.arange(len(frame)))
    return tg.write(str(tmp_path_factory.mktemp("d") / "digits"), frame, shard_rows=300)


def _expected(digits):
    return NNModel(_model(), transform=_to_float, features_col="image", classifier=True).transform(digits).to_pandas()


def _staged(out):
    return sorted(glob.glob(os.path.join(out, "data", ".stage-*", "part-*.json")))


def _same(got, want):
    assert got["id"].tolist() == want["id"].tolist()
    assert got["prediction"].tolist() == want["prediction"].tolist()
    np.testing.assert_allclose(np.stack(got["probability"]), np.stack(want["probability"]), rtol=1e-5, atol=1e-7)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.tuples(st.integers(0, 10**8), st.none()),
                 st.tuples(st.integers(0, 10**5), st.integers(1, 10**5))),
       st.floats(1, 1 << 16))
def test_parts_cover_every_row_once_in_order_and_stay_few_and_bounded(case, row_bytes):
    n, part_rows = case
    parts = parts_of(n, part_rows, row_bytes)
    assert [a for a, _ in parts] == ([0] if parts else []) + [b for _, b in parts[:-1]]
    assert (parts[-1][1] if parts else 0) == n and all(b > a for a, b in parts)
    if part_rows is not None:
        assert all(b - a == part_rows for a, b in parts[:-1])
        return
    assert all((b - a) * row_bytes <= PART_BYTES for a, b in parts)  # a part held in memory stays bounded
    sizes = [b - a for a, b in parts]
    assert sizes == sorted(sizes, reverse=True)  # equal parts, then the tail's smaller ones
    assert sum(k < sizes[0] for k in sizes) <= 3 * TAIL_SPLIT
    if row_bytes <= 1024:  # narrow rows: the row bounds decide
        assert len(parts) <= MAX_PARTS and all(k >= PART_ROWS // TAIL_SPLIT for k in sizes[:-1])
        if n >= 3 * PART_ROWS:  # the last part is a quarter: workers taking parts from one queue end together
            assert sizes[0] >= PART_ROWS and sizes[-1] <= -(-sizes[0] // TAIL_SPLIT)


def test_a_rerun_after_a_failure_computes_only_the_missing_parts(digits, tmp_path):
    out = str(tmp_path / "pred")
    flag = tmp_path / "armed"
    flag.touch()
    stage = NNModel(_model(), transform=FailOnce(flag, 650), features_col="image", classifier=True)
    with pytest.raises(tg.errors.TransformError, match="row 650 failed"):
        stage.transform(digits, out=out, part_rows=200)
    assert len(_staged(out)) == 3  # parts 0-2 were written whole; nothing is committed
    with pytest.raises(tg.DatasetNotFoundError):
        tg.open(out)
    got = stage.transform(digits, out=out, part_rows=200)
    assert stage.last_run == {"parts": 5, "computed": 2, "reused": 3}
    _same(got.to_pandas(), _expected(digits))
    assert tg.open(out).version == 1 and _staged(out) == [] and not glob.glob(os.path.join(out, "data", ".stage-*"))
    with pytest.raises(DatasetExistsError):  # refused before any work
        stage.transform(digits, out=out, part_rows=200)


def test_forked_workers_only_where_each_gets_one_thread(digits):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        assert not inference.jobs.can_fork(2, digits) and inference.jobs.can_fork(4, digits)
        torch.set_num_threads(1)
        assert inference.jobs.can_fork(2, digits)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("workers", ["forked", "fresh interpreters"])
def test_a_killed_worker_stops_the_run_and_the_rerun_resumes_on_two_workers(digits, tmp_path, workers, monkeypatch):
    if workers == "forked":
        assert inference.jobs.can_fork(2, digits), "a test before this one left Ray or a Flight client running"
    else:  # where forking is unsafe: the local engine's workers
        monkeypatch.setattr(inference.jobs, "can_fork", lambda *a: False)
    out = str(tmp_path / "pred")
    flag = tmp_path / "armed"
    flag.touch()
    stage = NNModel(_model(), transform=FailOnce(flag, 750, kill=True), features_col="image", classifier=True)
    with pytest.raises(WorkerFailedError, match="SIGKILL"):
        stage.transform(digits, out=out, workers=2, part_rows=100)  # part 7 holds row 750
    done = len(_staged(out))
    # the killed worker's parts before row 750 were written whole, but for the one still being written while
    # it computed the next (a part's write overlaps the next part's compute): at least 2 of its 3
    assert 2 <= done < 10
    got = stage.transform(digits, out=out, workers=2, part_rows=100)
    assert stage.last_run["reused"] == done and stage.last_run["computed"] == 10 - done
    _same(got.to_pandas(), _expected(digits))


def test_other_weights_are_other_work_and_in_memory_results_leave_no_files(digits, tmp_path):
    out = str(tmp_path / "pred")
    flag = tmp_path / "armed"
    flag.touch()
    with pytest.raises(tg.errors.TransformError):
        NNModel(_model(), transform=FailOnce(flag, 999), features_col="image").transform(digits, out=out,
                                                                                        part_rows=250)
    other = _model()
    with torch.no_grad():
        other[0].weight.add_(1.0)
    stage = NNModel(other, transform=_to_float, features_col="image")
    stage.transform(digits, out=out, part_rows=250)
    assert stage.last_run["reused"] == 0  # the parts of other weights are never taken
    before = set(os.listdir(os.environ.get("TMPDIR", "/tmp")))
    mem = NNModel(_model(), transform=_to_float, features_col="image", classifier=True)
    got = mem.transform(digits, workers=2, part_rows=300)
    assert mem.last_run == {"parts": 4, "computed": 4, "reused": 0}
    _same(got.to_pandas(), _expected(digits))
    assert not [n for n in set(os.listdir(os.environ.get("TMPDIR", "/tmp"))) - before if "infer" in n]


def test_a_torchscript_file_is_loaded_by_each_worker_and_a_bad_one_is_refused_first(digits, tmp_path):
    path = str(tmp_path / "m.pt")
    torch.jit.script(_model()).save(path)
    stage = NNModel(path, transform=_to_float, features_col="image", classifier=True)
    _same(stage.transform(digits, workers=2).to_pandas(), _expected(digits))
    (tmp_path / "bad.pt").write_bytes(b"not a model")
    for bad in (str(tmp_path / "bad.pt"), str(tmp_path / "missing.pt")):
        with pytest.raises(ModelLoadError, match=os.path.basename(bad)):
            NNModel(bad, features_col="image").transform(digits, out=str(tmp_path / "o"), workers=2)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("engine", ["ray", "spark"])
def test_the_parts_run_on_ray_and_spark_workers(digits, tmp_path, engine, request):
    request.getfixturevalue("ray_cluster" if engine == "ray" else "spark")
    stage = NNModel(_model(), transform=_to_float, features_col="image", classifier=True)
    got = stage.transform(digits, out=str(tmp_path / "pred"), engine=engine, workers=2, part_rows=250)
    assert stage.last_run == {"parts": 4, "computed": 4, "reused": 0}
    _same(got.to_pandas(), _expected(digits))


def test_a_transform_that_gives_the_wrong_shape_is_a_model_input_error(digits, tmp_path):
    def crop_too_much(batch):  # 63 values a row where the model takes 64
        batch["image"] = batch["image"].float().flatten(1)[:, :63]
        return batch

    with pytest.raises(tg.errors.ModelInputError, match=r"'image'.*\(256, 63\) float32.*mat1 and mat2"):
        NNModel(_model(), transform=crop_too_much, features_col="image").transform(digits)
    with pytest.raises(tg.errors.ModelInputError, match=r"'image'.*\(100, 63\) float32"):
        NNModel(_model(), transform=crop_too_much, features_col="image").transform(digits, out=str(tmp_path / "o"),
                                                                                 part_rows=100)
    assert not glob.glob(str(tmp_path / "o" / "data" / ".stage-*" / "*.json"))
    with pytest.raises(tg.TrainingConfigError, match=r"does not fit the data.*\(256, 63\).*mat1 and mat2"):
        tg.Trainer(_model(), loss=torch.nn.CrossEntropyLoss(), features="image", label="label",
                   transform=crop_too_much, epochs=1, quiet=True).fit(digits)  # the Trainer's own first check


def _scaled_by(scale, fail_flag=None):
    def scaled(batch):  # the same name and code whatever the scale: only its closure differs
        if fail_flag is not None and os.path.exists(fail_flag) and bool((batch["id"] >= 400).any()):
            raise RuntimeError("a bug")
        batch["image"] = batch["image"].float().div_(255).flatten(1) * scale
        return batch
    return scaled


def test_a_fixed_transform_of_the_same_name_never_reuses_the_buggy_parts_and_a_failed_run_vacuums(digits, tmp_path):
    out = str(tmp_path / "pred")
    flag = tmp_path / "armed"
    flag.touch()
    with pytest.raises(tg.errors.TransformError, match="a bug"):
        NNModel(_model(), transform=_scaled_by(1000, str(flag)), features_col="image").transform(
            digits, out=out, part_rows=200)
    assert len(_staged(out)) == 2
    fixed = NNModel(_model(), transform=_scaled_by(1), features_col="image", classifier=True)
    _same(fixed.transform(digits, out=out, part_rows=200).to_pandas(), _expected(digits))
    assert fixed.last_run["reused"] == 0
    assert tg.vacuum(out, min_age_s=0)["removed"] == 4  # the buggy run's 2 parts and their descriptions
    assert not glob.glob(os.path.join(out, "data", ".stage-*"))


def test_workers_errors_come_back_as_themselves_and_unreachable_outputs_are_refused_first(digits, tmp_path):
    flag = tmp_path / "armed"
    flag.touch()
    with pytest.raises(tg.errors.TransformError, match="row 450 failed"):
        NNModel(_model(), transform=FailOnce(flag, 450), features_col="image").transform(
            digits, out=str(tmp_path / "o"), workers=2, part_rows=250)
    with pytest.raises(tg.errors.UnsupportedURLError, match="memory://"):
        NNModel(_model(), transform=_to_float, features_col="image").transform(digits, out="memory://x/p", workers=2)
    empty = tg.from_arrow(digits.to_arrow().slice(0, 0))
    with pytest.raises(tg.errors.EmptyDataError):
        NNModel(_model(), transform=_to_float, features_col="image").transform(empty, out=str(tmp_path / "e"))


def test_a_run_that_died_after_its_commit_is_not_committed_twice(digits, tmp_path, monkeypatch):
    import tensorgrid.ml.inference as inference

    out = str(tmp_path / "pred")
    real = inference.tgfs.remove_tree

    def interrupted(fs, path):
        raise KeyboardInterrupt  # the driver stops between its commit and its clean-up

    monkeypatch.setattr(inference.tgfs, "remove_tree", interrupted)
    stage = NNModel(_model(), transform=_to_float, features_col="image", classifier=True)
    with pytest.raises(KeyboardInterrupt):
        stage.transform(digits, out=out, mode="append", part_rows=400)
    monkeypatch.setattr(inference.tgfs, "remove_tree", real)
    got = stage.transform(digits, out=out, mode="append", part_rows=400)
    assert stage.last_run == {"parts": 3, "computed": 0, "reused": 3}
    assert got.version == 1 and got.num_rows == 1000 and not _staged(out)


def test_a_quantized_model_is_keyed_and_run_in_parts(digits, tmp_path):
    q = torch.ao.quantization.quantize_dynamic(_model(), {torch.nn.Linear}, dtype=torch.qint8)
    stage = NNModel(q, transform=_to_float, features_col="image", classifier=True)
    got = stage.transform(digits, out=str(tmp_path / "q"), part_rows=500).to_pandas()
    assert got["prediction"].tolist() == stage.transform(digits).to_pandas()["prediction"].tolist()


def _in_place(batch):  # changes the batch it is given (a float column straight from the data)
    batch["w"].mul_(10)
    batch["image"] = batch["image"].float().div_(255).flatten(1)
    return batch


def test_a_transform_that_changes_its_batch_in_place_never_changes_a_later_read(tmp_path):
    """Parts of one row group share its decoded span (kept while a run goes): a batch changed in place must
    reach neither a rerun nor a plain loader over the same rows."""
    frame = digits_frame().iloc[:1000]
    ds = tg.write(str(tmp_path / "d"), frame.assign(w=np.ones(len(frame), np.float32)))
    stage = NNModel(_model(), transform=_in_place, features_col="image")
    first = stage.transform(ds, out=str(tmp_path / "a"), part_rows=100).to_pandas()
    again = stage.transform(ds, out=str(tmp_path / "b"), part_rows=100).to_pandas()
    assert first["w"].tolist() == again["w"].tolist() == [10.0] * 1000  # once, not again on the changed rows
    np.testing.assert_array_equal(np.stack(first["prediction"]), np.stack(again["prediction"]))
    for _ in range(2):
        (batch,) = list(tg.store.subsets.rows(ds, 0, 100).to_torch(batch_size=100, cache_dir=False))
        assert batch["w"].tolist() == [1.0] * 100
        batch["w"].mul_(10)
