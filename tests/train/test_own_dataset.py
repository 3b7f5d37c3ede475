"""A dataset kind defined outside the package (only the Dataset contract's three abstract members) trains
on 2 workers with shuffle and resumes exactly mid-epoch: the loader and the trainer use the contract only."""

import glob
import os

import pyarrow as pa
import torch

import tensorgrid as tg
from tensorgrid.quickstart import digits_frame
from tests.train import models


class TablesDataset(tg.Dataset):
    """Shards are Arrow tables held in a list (as a user's own source, e.g. another store, would give)."""

    def __init__(self, tables: list[pa.Table]):
        self.tables = tables
        self.url = "tables://digits"

    @property
    def schema(self) -> pa.Schema:
        return self.tables[0].schema

    @property
    def shard_rows(self) -> list[int]:
        return [t.num_rows for t in self.tables]

    def read_shard(self, i, columns=None, filter=None):
        t = self.tables[i] if filter is None else self.tables[i].filter(filter)
        return t.select(columns) if columns is not None else t


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_own_dataset_kind_trains_on_two_workers_and_resumes_mid_epoch(tmp_path):
    table = tg.write(str(tmp_path / "digits"), digits_frame().iloc[:1000]).to_arrow()  # image: a tensor column
    ds = TablesDataset([table.slice(0, 333), table.slice(333, 500), table.slice(833)])  # uneven shards

    def trainer(**kw):
        return tg.Trainer(model=models.mlp, loss=torch.nn.CrossEntropyLoss(), optimizer=models.sgd,
                          features="image", label="label", transform=models.to_float, batch_size=64, epochs=2,
                          workers=2, quiet=True, **kw)

    full = trainer().fit(ds)
    assert full.history[-1]["loss"] < full.history[0]["loss"]
    ck = str(tmp_path / "ck")
    trainer(checkpoint_dir=ck, checkpoint_every=5, keep_checkpoints=20).fit(ds)
    for f in glob.glob(f"{ck}/ckpt-*.pt"):  # the run "stopped" at step 20, mid-epoch 2 (16 steps each)
        if int(f.rsplit("-s", 1)[1][:9]) > 20:
            os.remove(f)
    resumed = trainer(checkpoint_dir=ck, checkpoint_every=5).fit(ds, resume=True)
    a, b = _weights(resumed.model), _weights(full.model)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
