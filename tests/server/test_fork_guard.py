"""A process in which gRPC ran (a Flight server or client, as here) never forks pools of workers: gRPC's
threads stay once started, and a child forked while one holds a lock hangs."""

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
    assert not jobs.can_fork(1024, ds)  # the threads outlive the server
