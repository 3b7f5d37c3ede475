"""``tensorgrid serve``: TLS and mutual TLS with throwaway certificates, limits, and the command itself as a real
process (prints its URL, serves, exits 0 on SIGTERM/SIGINT; a bad command line is one line and a non-zero exit)."""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.flight as flight
import pytest

from tensorgrid.server import auth, serve, sqlproto

from .certs import make_certs

flight_sql = pytest.importorskip("adbc_driver_flightsql.dbapi", reason="adbc-driver-flightsql is in the dev extras")

URL = re.compile(r"(grpc(?:\+tls)?://\S+)")


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def users_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("users") / "users.toml"
    path.write_text(f'[users.ignite]\npassword_hash = "{auth.hash_password("ignite", n=1 << 10)}"\nrole = "admin"\n'
                    f'[users.rd]\npassword_hash = "{auth.hash_password("rd", n=1 << 10)}"\nrole = "reader"\n')
    return path


def _select_one(client, options=None):
    info = client.get_flight_info(flight.FlightDescriptor.for_command(
        sqlproto.pack(sqlproto.CommandStatementQuery(query="SELECT 1 AS one"))), options)
    return client.do_get(info.endpoints[0].ticket, options).read_all().column("one").to_pylist()


# -- TLS, in this process ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tls_server(tmp_path_factory, certs):
    server = serve.start(tmp_path_factory.mktemp("tlsgrid"), port=0, tls_cert=str(certs.server.cert),
                         tls_key=str(certs.server.key), memory_limit="256MB")
    yield server
    server.close()


def test_tls_with_the_right_ca_works(tls_server, certs):
    assert tls_server.url.startswith("grpc+tls://127.0.0.1:")
    client = flight.FlightClient(tls_server.url, tls_root_certs=certs.ca.cert_pem)
    assert _select_one(client) == [1]


@pytest.mark.parametrize("roots", ["none", "other"])
def test_tls_without_the_ca_fails_cleanly(tls_server, certs, roots):
    kwargs = {"tls_root_certs": certs.other_ca.cert_pem} if roots == "other" else {}
    client = flight.FlightClient(tls_server.url, **kwargs)
    t0 = time.monotonic()
    with pytest.raises(flight.FlightUnavailableError):
        _select_one(client, flight.FlightCallOptions(timeout=10))
    assert time.monotonic() - t0 < 10


def test_plain_grpc_to_a_tls_server_fails_cleanly(tls_server):
    client = flight.FlightClient(tls_server.url.replace("grpc+tls", "grpc"))
    with pytest.raises(flight.FlightUnavailableError):
        _select_one(client, flight.FlightCallOptions(timeout=10))


def test_adbc_driver_over_tls_with_the_ca(tls_server, certs):
    with flight_sql.connect(tls_server.url, db_kwargs={
            "adbc.flight.sql.client_option.tls_root_certs": certs.ca.cert_pem.decode()}, autocommit=True) as conn:
        cur = conn.cursor()
        cur.execute("SELECT 42 AS x")
        assert cur.fetchall() == [(42,)]
        cur.close()


@pytest.fixture(scope="module")
def mtls_server(tmp_path_factory, certs, users_file):
    server = serve.start(tmp_path_factory.mktemp("mtlsgrid"), port=0, tls_cert=str(certs.server.cert),
                         tls_key=str(certs.server.key), tls_client_ca=str(certs.ca.cert), users=str(users_file),
                         memory_limit="256MB")
    yield server
    server.close()


def test_mutual_tls_with_a_client_certificate_and_password_works(mtls_server, certs):
    client = flight.FlightClient(mtls_server.url, tls_root_certs=certs.ca.cert_pem, cert_chain=certs.client.cert_pem,
                                 private_key=certs.client.key_pem)
    header = client.authenticate_basic_token("ignite", "ignite")
    assert _select_one(client, flight.FlightCallOptions(headers=[header])) == [1]


def test_mutual_tls_without_a_client_certificate_is_refused(mtls_server, certs):
    client = flight.FlightClient(mtls_server.url, tls_root_certs=certs.ca.cert_pem)
    with pytest.raises(flight.FlightUnavailableError):
        _select_one(client, flight.FlightCallOptions(timeout=10))
    with pytest.raises(flight.FlightError):  # pyarrow's handshake reports the refusal as an internal error
        client.authenticate_basic_token("ignite", "ignite")


def test_mutual_tls_with_a_certificate_from_another_ca_is_refused(mtls_server, certs, tmp_path):
    stranger = make_certs(tmp_path)  # a client certificate signed by a CA the server does not trust
    client = flight.FlightClient(mtls_server.url, tls_root_certs=certs.ca.cert_pem,
                                 cert_chain=stranger.client.cert_pem, private_key=stranger.client.key_pem)
    with pytest.raises(flight.FlightUnavailableError):
        _select_one(client, flight.FlightCallOptions(timeout=10))


def test_mutual_tls_still_needs_the_password(mtls_server, certs):
    client = flight.FlightClient(mtls_server.url, tls_root_certs=certs.ca.cert_pem, cert_chain=certs.client.cert_pem,
                                 private_key=certs.client.key_pem)
    with pytest.raises(flight.FlightUnauthenticatedError):
        _select_one(client)


# -- options and limits --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, says", [
    ({"tls_cert": "x.pem"}, "needs both --tls-cert and --tls-key"),
    ({"tls_client_ca": "ca.pem"}, "needs --tls-cert and --tls-key"),
    ({"tls_cert": "/no/such.pem", "tls_key": "/no/such.key"}, "--tls-cert /no/such.pem: No such file"),
    ({"host": "0.0.0.0"}, "without --users anyone there could read"),
    ({"host": "10.1.2.3"}, "give --users users.toml"),
])
def test_start_refuses_unsafe_or_incomplete_options_in_one_line(tmp_path, kwargs, says):
    with pytest.raises(serve.ServeError) as info:
        serve.start(tmp_path, port=0, **kwargs)
    assert says in str(info.value) and "\n" not in str(info.value)


def test_a_certificate_file_that_is_not_pem_is_named(tmp_path, certs):
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    with pytest.raises(serve.ServeError, match="junk.pem is not a PEM file holding a certificate"):
        serve.start(tmp_path / "g", port=0, tls_cert=str(junk), tls_key=str(certs.server.key))


def test_loopback_is_recognised():
    assert all(serve.is_loopback(h) for h in ("127.0.0.1", "127.3.2.1", "::1", "[::1]", "localhost"))
    assert not any(serve.is_loopback(h) for h in ("0.0.0.0", "10.0.0.1", "::", "example.org"))


def test_allow_defaults_to_the_root_and_keeps_urls(tmp_path):
    with serve.start(tmp_path / "a", port=0, memory_limit="256MB") as server:
        assert server.allow == [str(tmp_path / "a")]
    with serve.start(tmp_path / "b", port=0, memory_limit="256MB", allow=["s3://bucket/data", "rel/dir"]) as server:
        assert server.allow == ["s3://bucket/data", os.path.abspath("rel/dir")]


def test_a_query_over_its_time_limit_is_interrupted(tmp_path):
    server = serve.start(tmp_path, port=0, memory_limit="256MB", threads=1, query_timeout=1.0)
    try:
        client = flight.FlightClient(server.url)
        t0 = time.monotonic()
        with pytest.raises(flight.FlightError, match="(?i)interrupt"):
            info = client.get_flight_info(flight.FlightDescriptor.for_command(sqlproto.pack(
                sqlproto.CommandStatementQuery(query="SELECT count(*) FROM range(100000000000) a"))))
            client.do_get(info.endpoints[0].ticket).read_all()
        assert time.monotonic() - t0 < 8
        assert _select_one(client) == [1]  # the server goes on serving
    finally:
        server.close()
    assert not server._running._thread.is_alive()


# -- the time limit of a call: one clock per call, a transaction's statements included ----------------------

LIMIT = 1.0
_LONG = "SELECT sum(hash(a * 7)) AS s FROM range(5000000000) t(a)"  # minutes of work for one DuckDB thread
_NO_HANG = flight.FlightCallOptions(timeout=15)  # a server that never stops the query: a failure, not a hang


@pytest.fixture(scope="module")
def timed(tmp_path_factory):
    """A bare Flight client of a server whose calls may keep DuckDB at work for LIMIT seconds."""
    server = serve.start(tmp_path_factory.mktemp("timed"), port=0, memory_limit="256MB", threads=1,
                         query_timeout=LIMIT)
    client = flight.connect(server.url)
    yield client
    client.close()
    server.close()


def _action(client, name, message):
    results = [r.body.to_pybytes() for r in client.do_action(flight.Action(name, sqlproto.pack(message)), _NO_HANG)]
    return sqlproto.unpack(results[0]) if results else None


def _begin(client) -> bytes:
    return _action(client, "BeginTransaction", sqlproto.ActionBeginTransactionRequest()).transaction_id


def _end(client, txn: bytes, action: int) -> None:  # 1 commit, 2 roll back
    _action(client, "EndTransaction", sqlproto.ActionEndTransactionRequest(transaction_id=txn, action=action))


def _rows(client, sql: str, txn: bytes | None = None) -> list:
    command = sqlproto.CommandStatementQuery(query=sql, **({"transaction_id": txn} if txn else {}))
    info = client.get_flight_info(flight.FlightDescriptor.for_command(sqlproto.pack(command)), _NO_HANG)
    return client.do_get(info.endpoints[0].ticket, _NO_HANG).read_all().to_pylist()


def _update(client, sql: str, txn: bytes | None = None) -> int:
    command = sqlproto.CommandStatementUpdate(query=sql, **({"transaction_id": txn} if txn else {}))
    writer, reader = client.do_put(flight.FlightDescriptor.for_command(sqlproto.pack(command)), pa.schema([]),
                                   _NO_HANG)
    writer.done_writing()
    result = reader.read()
    writer.close()  # a failed update raises here
    return sqlproto.parse(sqlproto.DoPutUpdateResult, result.to_pybytes()).record_count


def test_a_runaway_statement_in_a_transaction_begun_long_ago_is_interrupted_then_rolls_back(timed):
    """A transaction's statements run on its cursor, made at BeginTransaction: each is timed from its own
    start, so a runaway query or update in an old transaction is stopped at the limit with a one-line error
    naming it, and the transaction can still be rolled back."""
    table = f"kept_{os.urandom(4).hex()}"
    _update(timed, f"CREATE TABLE {table} (v BIGINT)")
    for runaway in (lambda txn: _rows(timed, _LONG, txn),
                    lambda txn: _update(timed, f"INSERT INTO {table} SELECT sum(hash(a)) % 1000 FROM range(5000000000) t(a)",
                                        txn)):
        txn = _begin(timed)
        assert _update(timed, f"INSERT INTO {table} VALUES (1)", txn) == 1
        time.sleep(LIMIT * 1.5)  # the transaction is older than the limit
        started = time.monotonic()
        with pytest.raises(flight.FlightCancelledError) as caught:
            runaway(txn)
        assert LIMIT <= time.monotonic() - started < LIMIT + 4
        message = str(caught.value).split(". Detail:")[0]
        assert "interrupted after 1 s: this server's time limit for one call (--query-timeout)" in message
        assert "\n" not in message
        _end(timed, txn, 2)
    assert _rows(timed, f"SELECT count(*) AS n FROM {table}") == [{"n": 0}]  # both rolled back


def test_a_quick_statement_in_a_transaction_older_than_the_limit_is_not_interrupted(timed):
    table = f"kept_{os.urandom(4).hex()}"
    _update(timed, f"CREATE TABLE {table} (v BIGINT)")
    txn = _begin(timed)
    for i in range(3):  # the transaction's cursor works far longer than the limit, each statement briefly
        time.sleep(LIMIT * 0.8)
        assert _update(timed, f"INSERT INTO {table} VALUES ({i})", txn) == 1
        assert _rows(timed, f"SELECT count(*) AS n FROM {table}", txn) == [{"n": i + 1}]
    _end(timed, txn, 1)
    assert _rows(timed, f"SELECT count(*) AS n FROM {table}") == [{"n": 3}]


def test_a_cursor_at_work_outside_the_sql_calls_is_held_to_the_limit_too(timed):
    """A service's own cursor (the table listing counts every table's rows) works outside any watched call:
    it is timed from when it was made."""
    view = f"slow_{os.urandom(4).hex()}"
    _update(timed, f"CREATE VIEW {view} AS SELECT a FROM range(5000000000) t(a) WHERE hash(a * 7) % 3 = 0")
    try:
        started = time.monotonic()
        with pytest.raises(flight.FlightError, match="(?i)interrupt"):
            list(timed.do_action(flight.Action("datasets.tables", b"{}"), _NO_HANG))
        assert time.monotonic() - started < LIMIT + 4
    finally:
        _update(timed, f"DROP VIEW {view}")


# -- the command, as a real process --------------------------------------------------------------------------

def _cli(*args):
    return [sys.executable, "-m", "tensorgrid.cli", *args]


def _start(*args, timeout=30):
    """The `tensorgrid serve` process and the URL from the one line it prints."""
    proc = subprocess.Popen(_cli("serve", "--port", "0", "--memory-limit", "256MB", *args),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    match = URL.search(line)
    if not match:
        proc.kill()
        raise AssertionError(f"no URL printed: {line!r} {proc.stderr.read()!r}")
    return proc, match.group(1)


def _stop(proc, sig):
    proc.send_signal(sig)
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return proc.returncode, out, err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_prints_its_url_serves_adbc_and_exits_0_on_a_signal(tmp_path, users_file, sig):
    proc, url = _start("--root", str(tmp_path / "grid"), "--users", str(users_file))
    try:
        assert url.startswith("grpc://127.0.0.1:")
        with flight_sql.connect(url, db_kwargs={"username": "ignite", "password": "ignite"}, autocommit=True) as conn:
            cur = conn.cursor()
            cur.execute("CREATE TABLE kitten (id BIGINT PRIMARY KEY, name VARCHAR)")
            cur.execute("INSERT INTO kitten VALUES (1, 'WARM KITTY')")
            cur.close()
        with flight_sql.connect(url, db_kwargs={"username": "rd", "password": "rd"}, autocommit=True) as conn:
            cur = conn.cursor()
            cur.execute("SELECT name FROM kitten")
            assert cur.fetchall() == [("WARM KITTY",)]
            with pytest.raises(flight_sql.Error, match="may not write"):
                cur.execute("DELETE FROM kitten")
            cur.close()
    finally:
        code, out, err = _stop(proc, sig)
    assert code == 0, err
    assert out == "" and "Traceback" not in err  # the URL line was the only output
    assert "ignite" not in err.replace("user 'ignite'", "")  # no password in the log


def test_serve_with_mutual_tls_from_the_command_line(tmp_path, certs, users_file):
    proc, url = _start("--root", str(tmp_path / "grid"), "--users", str(users_file),
                       "--tls-cert", str(certs.server.cert), "--tls-key", str(certs.server.key),
                       "--tls-client-ca", str(certs.ca.cert))
    try:
        assert url.startswith("grpc+tls://127.0.0.1:")
        client = flight.FlightClient(url, tls_root_certs=certs.ca.cert_pem, cert_chain=certs.client.cert_pem,
                                     private_key=certs.client.key_pem)
        header = client.authenticate_basic_token("ignite", "ignite")
        assert _select_one(client, flight.FlightCallOptions(headers=[header])) == [1]
        with pytest.raises(flight.FlightUnavailableError):
            _select_one(flight.FlightClient(url, tls_root_certs=certs.ca.cert_pem), flight.FlightCallOptions(timeout=10))
    finally:
        code, _, err = _stop(proc, signal.SIGTERM)
    assert code == 0, err


def test_hash_password_from_stdin_makes_a_hash_the_server_accepts(tmp_path):
    done = subprocess.run(_cli("serve", "--hash-password"), input="correct horse\n", capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    hashed = done.stdout.strip()
    assert auth.verify_password("correct horse", hashed) and not auth.verify_password("correct horse\n", hashed)


@pytest.fixture
def busy_port():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock.getsockname()[1]
    sock.close()


@pytest.mark.parametrize("args, says", [
    (["--port", "8815"], "serve needs --root"),
    (["--root", "{tmp}/g", "--port", "70000"], "--port must be an int in [0, 65535]"),
    (["--root", "{tmp}/g", "--host", "0.0.0.0", "--port", "0"], "give --users"),
    (["--root", "{tmp}/g", "--tls-cert", "{tmp}/c.pem", "--port", "0"], "needs both --tls-cert and --tls-key"),
    (["--root", "{tmp}/g", "--users", "{tmp}/missing.toml", "--port", "0"], "missing.toml does not exist"),
    (["--root", "{tmp}/g", "--users", "{tmp}/plain.toml", "--port", "0"], "plain password"),
    (["--root", "{tmp}/g", "--memory-limit", "lots", "--port", "0"], "cannot open the grid database"),
    (["--root", "{tmp}/g", "--port", "{busy}"], "cannot serve on 127.0.0.1:{busy}"),
    (["--root", "{tmp}/g", "--frobnicate"], "unrecognized arguments: --frobnicate"),
])
def test_bad_serve_arguments_are_one_line_and_a_nonzero_exit(tmp_path, busy_port, args, says):
    (tmp_path / "plain.toml").write_text('[users.a]\npassword = "x"\nrole = "admin"\n')
    fill = {"tmp": str(tmp_path), "busy": str(busy_port)}
    done = subprocess.run(_cli("serve", *(a.format(**fill) for a in args)), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and says.format(**fill) in lines[0], done.stderr
    assert done.stdout == ""


def test_the_shared_client_connection_signs_in_over_mutual_tls(mtls_server, certs):
    from tensorgrid.server.connection import open_flight

    client, options = open_flight(mtls_server.url, username="rd", password="rd", tls_root_certs=certs.ca.cert_pem,
                                  cert_chain=certs.client.cert_pem, private_key=certs.client.key_pem, timeout=10)
    assert _select_one(client, options) == [1]
    with pytest.raises(flight.FlightUnauthenticatedError):
        open_flight(mtls_server.url, username="rd", password="wrong", tls_root_certs=certs.ca.cert_pem,
                    cert_chain=certs.client.cert_pem, private_key=certs.client.key_pem)
