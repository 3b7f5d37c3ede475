"""Features as a list of columns (a wide table) and integer labels of any width: trained, validated and checked
like one tensor column."""

import pyarrow as pa
import pytest
import torch

import tensorgrid as tg
from tensorgrid.train import stack_features
from tests.train import models
from tests.train.helpers import same, trainer, weights

PX = [f"px{i}" for i in range(64)]


def test_a_wide_table_with_int32_labels_trains_like_one_tensor_column_on_two_workers(wide):
    """px0..px63 (float64) stacked into one float32 (rows, 64) tensor per batch and int32 labels widened to
    int64: the same updates as the image column (uint8 8x8, to_float) with int64 labels, validation too."""
    table, image = wide
    w = trainer(features=PX, transform=None, workers=2).fit(table, val=table)
    one = trainer(workers=1).fit(image, val=image)
    assert same(weights(w.model), weights(one.model), atol=1e-4)
    for a, b in zip(w.history, one.history):
        for k in ("loss", "accuracy", "val_loss", "val_accuracy"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k


def test_stack_features_is_one_float32_tensor_of_the_columns_side_by_side():
    batch = {"a": torch.tensor([1, 2], dtype=torch.int32), "b": torch.tensor([0.5, 1.5], dtype=torch.float64),
             "v": torch.tensor([[7, 8], [9, 10]], dtype=torch.uint8), "s": ["x", "y"]}
    x = stack_features(batch, ("a", "b"))
    assert x.dtype == torch.float32 and x.tolist() == [[1.0, 0.5], [2.0, 1.5]]
    assert stack_features(batch, ("v", "a")).tolist() == [[7, 8, 1], [9, 10, 2]]  # a tensor column flattened
    assert stack_features(batch, "v") is batch["v"]  # one column: as the loader made it
    with pytest.raises(tg.TrainingConfigError, match="column 's' is not numeric"):
        stack_features(batch, ("a", "s"))


def test_feature_lists_are_checked_before_any_worker_with_what_is_accepted(wide):
    table, _ = wide
    with pytest.raises(tg.TrainingConfigError, match=r"has no column 'px64' \(features must be a column name or a "
                                                     r"list of column names of the dataset; missing: \['px64', "
                                                     r"'nope'\]\); columns: \['px0', .*\(65 columns\)"):
        trainer(features=[*PX, "px64", "nope"], transform=None).fit(table)
    for bad in (3, [], ["px0", 1], "px0 px1".split() * 2):
        with pytest.raises(tg.TrainingConfigError, match="features must be a column name or a list of column"):
            trainer(features=bad)
    with pytest.raises(tg.TrainingConfigError, match=r"on a batch with 60 feature columns stacked \(64, 60\) "
                                                     r"torch.float32"):
        trainer(features=PX[:60], transform=None).fit(table)
    named = tg.from_arrow(table.to_arrow().append_column("name", pa.array(["x"] * table.num_rows)))
    with pytest.raises(tg.TrainingConfigError, match="column 'name' is not numeric"):
        trainer(features=[*PX[:63], "name"], transform=None).fit(named)


def test_a_wide_model_predicts_from_the_same_columns(wide):
    """Trainer.predict hands its features to tensorgrid.train.predict (predict.py), which stacks them with
    stack_features."""
    table, _ = wide
    t = trainer(features=PX, transform=None, epochs=1)
    t.fit(table)
    pred = t.predict(table)
    assert pred.num_rows == table.num_rows and {"prediction", "probability", "label"} <= set(pred.schema.names)
    assert not set(PX) & set(pred.schema.names)


def test_int32_labels_train_with_nll_loss_too(wide):
    table, image = wide
    kw = dict(model=models.log_softmax_mlp, loss=torch.nn.NLLLoss(), epochs=1)
    assert same(weights(trainer(features=PX, transform=None, **kw).fit(table).model),
                weights(trainer(**kw).fit(image).model), atol=1e-5)


def test_a_list_of_plain_features_reaches_the_model_as_the_loaders_stacked_tensor(wide, tmp_path):
    """Training and predict ask the loader for the features as one tensor (from the Arrow cache: a view of
    the rows as gathered); the model sees the same input as stacked per batch."""
    from tensorgrid.train.features import STACKED, loader_stack
    from tensorgrid.train.loop import rank_loader

    table, _ = wide
    stored = tg.write(str(tmp_path / "w"), table.to_arrow())
    assert loader_stack(stored.schema, PX, keep=["label"]) == {STACKED: PX}
    assert loader_stack(stored.schema, PX, keep=["px3"]) is None  # a feature also needed on its own
    assert loader_stack(stored.schema, "px0") is None
    spec = trainer(features=PX, transform=None)._spec(stored, None, None)
    batch = next(iter(rank_loader(spec, stored, 0, 1)))
    assert set(batch) == {STACKED, "label"} and batch[STACKED].shape[1] == 64
    model = torch.nn.Linear(64, 3)
    with_stack = tg.predict(model, stored, features=PX, keep=["label"]).to_arrow()
    per_batch = tg.predict(model, stored, features=PX, keep=["label"], transform=lambda b: b).to_arrow()
    assert with_stack.equals(per_batch)
