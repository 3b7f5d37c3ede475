"""The public API on one screen: the names the issues make part of the contract."""

import tensorgrid as tg


def test_contract_names():
    for name in ("write", "open", "sql", "from_arrow", "ingest_images", "Dataset", "Trainer", "FitResult"):
        assert callable(getattr(tg, name)), name
    for name in ("decode_image", "resize", "normalize", "to_float", "compose"):
        assert callable(getattr(tg.transforms, name)), name
    for name in ("CorruptShardError", "SchemaMismatchError", "ConflictError", "DatasetNotFoundError",
                 "WorkerFailedError", "TrainingConfigError", "CheckpointError"):
        assert issubclass(getattr(tg, name), tg.TensorGridError), name
    for method in ("to_torch", "to_arrow", "to_pandas", "head", "sql", "verify", "versions", "shard_urls"):
        assert hasattr(tg.Dataset, method), method
