"""A process in which gRPC runs (a Flight server or client, as here) never forks pools of workers: a child
forked while one of gRPC's threads holds a lock hangs."""

import pyarrow as pa
import pyarrow.flight as flight

import tensorgrid as tg
from tensorgrid.ml import jobs


def test_a_process_that_ran_grpc_never_forks_its_workers(tmp_path):
    ds = tg.write(str(tmp_path / "d"), pa.table({"x": list(range(10))}))
    server = flight.FlightServerBase("grpc://127.0.0.1:0")
    try:
        assert jobs._grpc_started() and not jobs.can_fork(1024, ds)
    finally:
        server.shutdown()
