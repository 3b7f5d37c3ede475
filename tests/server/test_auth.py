"""Users, passwords, tokens and roles on a real grid server (in this process, on loopback): who is refused
with UNAUTHENTICATED, who with PERMISSION_DENIED, and that the ADBC driver signs in unchanged."""

import base64
import logging
import time
import uuid

import pyarrow as pa
import pyarrow.flight as flight
import pytest

from tensorgrid.server import GridServer, auth, sqlproto

flight_sql = pytest.importorskip("adbc_driver_flightsql.dbapi", reason="adbc-driver-flightsql is in the dev extras")

FAST = {"n": 1 << 10}  # a cheap scrypt for tests; the server reads the cost from each hash


def _users(**roles_and_passwords) -> dict:
    return {name: auth.User(name, auth.hash_password(pw, **FAST), role)
            for name, (role, pw) in roles_and_passwords.items()}


USERS = _users(ignite=("admin", "ignite"), rd=("reader", "read-only"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with GridServer(tmp_path_factory.mktemp("authgrid"), memory_limit="512MB", threads=1,
                    **auth.server_options(USERS)) as s:
        yield s


def _client(server):
    return flight.FlightClient(server.url)


def _signed_in(server, user, password, with_header=False):
    client = _client(server)
    header = client.authenticate_basic_token(user, password)
    options = flight.FlightCallOptions(headers=[header])
    return (client, options, header) if with_header else (client, options)


def _name(prefix):
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def _query(client, sql, options=None):
    info = client.get_flight_info(flight.FlightDescriptor.for_command(
        sqlproto.pack(sqlproto.CommandStatementQuery(query=sql))), options)
    return client.do_get(info.endpoints[0].ticket, options).read_all()


def _put(client, command, table=None, options=None):
    schema = table.schema if table is not None else pa.schema([])
    writer, reader = client.do_put(flight.FlightDescriptor.for_command(sqlproto.pack(command)), schema, options)
    if table is not None:
        writer.write_table(table)
    writer.done_writing()
    answer = reader.read()
    writer.close()
    return sqlproto.DoPutUpdateResult.FromString(answer.to_pybytes()).record_count if answer is not None else None


def _update(client, sql, options=None):
    return _put(client, sqlproto.CommandStatementUpdate(query=sql), None, options)


def _ingest(client, table_name, table, options=None):
    command = sqlproto.CommandStatementIngest(table=table_name)
    command.table_definition_options.if_not_exist = sqlproto.TableNotExistOption.CREATE
    command.table_definition_options.if_exists = sqlproto.TableExistsOption.APPEND
    return _put(client, command, table, options)


# -- passwords and the users file ------------------------------------------------------------------------------

def test_password_hashes_are_salted_and_verify_only_the_right_password():
    one, two = auth.hash_password("s3cret", **FAST), auth.hash_password("s3cret", **FAST)
    assert one != two and one.startswith("scrypt$") and "s3cret" not in one
    assert auth.verify_password("s3cret", one) and auth.verify_password("s3cret", two)
    assert not auth.verify_password("s3cret ", one) and not auth.verify_password("", one)


def test_users_file_is_read_with_roles(tmp_path):
    path = tmp_path / "users.toml"
    path.write_text(f'[users.ignite]\npassword_hash = "{auth.hash_password("x", **FAST)}"\nrole = "admin"\n'
                    f'[users.rd]\npassword_hash = "{auth.hash_password("y", **FAST)}"\nrole = "reader"\n')
    users = auth.load_users(path)
    assert {u.name: u.role for u in users.values()} == {"ignite": "admin", "rd": "reader"}
    assert users["ignite"].rights == {auth.READ, auth.WRITE} and users["rd"].rights == {auth.READ}
    assert auth.verify_password("y", users["rd"].password_hash)


@pytest.mark.parametrize("text, says", [
    ('[users.a]\npassword = "plain"\nrole = "admin"\n', "plain password"),
    ('[users.a]\npassword_hash = "HASH"\nrole = "root"\n', "role must be one of admin, reader"),
    ('[users.a]\npassword_hash = "md5$abc"\nrole = "admin"\n', "scrypt$N$r$p$salt$hash"),
    ('[users.a]\npassword_hash = "HASH"\nrole = "admin"\npasswd = 1\n', "unknown keys passwd"),
    ('[users.a]\nrole = "admin"\n', "needs a password_hash"),
    ('[people.a]\nrole = "admin"\n', "expected [users.<name>]"),
    ('[users.a\n', "not valid TOML"),
])
def test_a_bad_users_file_is_refused_in_one_line_naming_the_fix(tmp_path, text, says):
    path = tmp_path / "users.toml"
    path.write_text(text.replace("HASH", auth.hash_password("x", **FAST)))
    with pytest.raises(auth.UsersFileError) as info:
        auth.load_users(path)
    assert says in str(info.value) and "\n" not in str(info.value)


def test_a_missing_users_file_is_named():
    with pytest.raises(auth.UsersFileError, match="does-not-exist.toml does not exist"):
        auth.load_users("does-not-exist.toml")


# -- authentication ------------------------------------------------------------------------------------------

def test_basic_handshake_answers_a_bearer_token_that_later_calls_use(server):
    client, options = _signed_in(server, "ignite", "ignite")
    assert _query(client, "SELECT 41 + 1 AS x", options).column("x").to_pylist() == [42]


def test_the_token_is_a_random_bearer_token(server):
    headers = [_client(server).authenticate_basic_token("rd", "read-only") for _ in range(2)]
    assert all(k == b"authorization" and v.startswith(b"Bearer ") for k, v in headers)
    assert headers[0] != headers[1] and len(headers[0][1]) > 40 and b"read-only" not in headers[0][1]


def test_no_credentials_is_unauthenticated_on_every_kind_of_call(server):
    client = _client(server)
    with pytest.raises(flight.FlightUnauthenticatedError, match="needs a username and password"):
        _query(client, "SELECT 1")
    with pytest.raises(flight.FlightUnauthenticatedError):
        list(client.list_actions())
    with pytest.raises(flight.FlightUnauthenticatedError):
        client.do_get(flight.Ticket(b"anything")).read_all()
    with pytest.raises(flight.FlightUnauthenticatedError):
        _update(client, "CREATE TABLE t_unauth (a INT)")


@pytest.mark.parametrize("user, password", [("ignite", "wrong"), ("ignite", ""), ("nobody", "ignite"),
                                            ("rd", "ignite")])
def test_a_wrong_password_or_unknown_user_is_unauthenticated(server, user, password):
    with pytest.raises(flight.FlightUnauthenticatedError, match="wrong username or password"):
        _client(server).authenticate_basic_token(user, password)


@pytest.mark.parametrize("header", [b"Bearer not-a-token", b"Bearer ", b"Basic !!!not base64!!!",
                                    b"Basic " + base64.b64encode(b"no colon here"), b"Digest abc", b"garbage"])
def test_a_bad_token_or_malformed_header_is_unauthenticated(server, header):
    options = flight.FlightCallOptions(headers=[(b"authorization", header)])
    with pytest.raises(flight.FlightUnauthenticatedError):
        _query(_client(server), "SELECT 1", options)


def test_basic_credentials_work_on_any_call_with_or_without_base64_padding(server):
    encoded = base64.b64encode(b"ignite:ignite")
    assert encoded.endswith(b"=")  # 13 bytes: padded
    for value in (encoded, encoded.rstrip(b"=")):
        options = flight.FlightCallOptions(headers=[(b"authorization", b"Basic " + value)])
        assert _query(_client(server), "SELECT 1 AS one", options).num_rows == 1


def test_an_expired_token_is_unauthenticated(tmp_path):
    with GridServer(tmp_path, memory_limit="256MB", threads=1,
                    **auth.server_options(USERS, token_ttl=0.3)) as s:
        client, options = _signed_in(s, "ignite", "ignite")
        assert _query(client, "SELECT 1", options).num_rows == 1
        time.sleep(0.2)
        assert _query(client, "SELECT 1", options).num_rows == 1  # use renews it
        time.sleep(0.6)
        with pytest.raises(flight.FlightUnauthenticatedError, match="invalid or expired token"):
            _query(client, "SELECT 1", options)


def test_tg_connect_signs_in_again_when_its_token_expired_but_a_given_token_does_not(tmp_path):
    import tensorgrid as tg
    from tensorgrid.server.client import GridAuthenticationError

    with GridServer(tmp_path, memory_limit="256MB", threads=1,
                    **auth.server_options(USERS, token_ttl=0.3)) as s:
        g = tg.connect(s.url, username="ignite", password="ignite")
        g.sql("CREATE TABLE t (id BIGINT PRIMARY KEY)")
        first = g.session.connection()[0]
        time.sleep(0.6)  # the token expired: the next calls sign in again with the password
        assert g.sql("INSERT INTO t VALUES (1)") == 1  # done once, not twice
        with pytest.raises(pa.ArrowInvalid, match="closed"):  # the refused channel was closed, not leaked
            first.list_actions()
        assert g.sql("SELECT count(*) AS n FROM t").to_pandas()["n"].tolist() == [1]
        client, options, header = _signed_in(s, "ignite", "ignite", with_header=True)
        token = header[1].decode().split(" ", 1)[1]
        g2 = tg.connect(s.url, token=token)
        time.sleep(0.6)
        with pytest.raises(GridAuthenticationError, match="expired"):
            g2.sql("SELECT 1")


def test_a_pickled_grid_dataset_carries_a_token_not_the_password(tmp_path):
    import pickle

    import tensorgrid as tg

    with GridServer(tmp_path, memory_limit="256MB", threads=1, **auth.server_options(USERS)) as s:
        g = tg.connect(s.url, username="ignite", password="ignite")
        g.sql("CREATE TABLE p (id BIGINT PRIMARY KEY)")
        g.sql("INSERT INTO p SELECT range FROM range(10)")
        reader = tg.connect(s.url, username="rd", password="read-only")
        blob = pickle.dumps(reader.dataset("p"))
        assert b"read-only" not in blob
        copy = pickle.loads(blob)
        assert copy.session.password is None and copy.session.token
        assert sorted(copy.to_arrow().column("id").to_pylist()) == list(range(10))
        assert reader.sql("SELECT count(*) AS n FROM p").to_pandas()["n"].tolist() == [10]


def test_a_token_from_another_server_is_unauthenticated(server, tmp_path):
    with GridServer(tmp_path, memory_limit="256MB", threads=1, **auth.server_options(USERS)) as other:
        _, options = _signed_in(other, "ignite", "ignite")
    with pytest.raises(flight.FlightUnauthenticatedError):
        _query(_client(server), "SELECT 1", options)


def test_a_server_without_users_takes_no_credentials_and_says_so(tmp_path):
    with GridServer(tmp_path, memory_limit="256MB", threads=1, **auth.server_options(None)) as s:
        assert _query(_client(s), "SELECT 1", None).num_rows == 1
        with pytest.raises(flight.FlightUnauthenticatedError, match="has no users"):
            _client(s).authenticate_basic_token("ignite", "ignite")


def test_no_password_or_token_reaches_the_log(server, caplog):
    caplog.set_level(logging.DEBUG)
    with pytest.raises(flight.FlightUnauthenticatedError):
        _client(server).authenticate_basic_token("ignite", "hunter2-wrong")
    _, _, header = _signed_in(server, "ignite", "ignite", with_header=True)
    token = header[1].split(b" ", 1)[1].decode()
    text = caplog.text
    assert "failed sign-in for user 'ignite'" in text and "signed in" in text
    assert "hunter2-wrong" not in text and "ignite:ignite" not in text
    assert base64.b64encode(b"ignite:hunter2-wrong").decode().rstrip("=") not in text
    assert token not in text


# -- roles ---------------------------------------------------------------------------------------------------

def test_admin_may_create_insert_delete_and_ingest(server):
    client, options = _signed_in(server, "ignite", "ignite")
    t = _name("kitten")
    _update(client, f"CREATE TABLE {t} (id BIGINT PRIMARY KEY, name VARCHAR)", options)
    assert _update(client, f"INSERT INTO {t} VALUES (1, 'WARM KITTY'), (2, 'SOFT KITTY')", options) == 2
    assert _ingest(client, t, pa.table({"id": [3], "name": ["PURR"]}), options) == 1
    assert _update(client, f"DELETE FROM {t} WHERE id = 1", options) == 1
    assert _query(client, f"SELECT id FROM {t} ORDER BY id", options).column("id").to_pylist() == [2, 3]


@pytest.fixture(scope="module")
def shared_table(server):
    client, options = _signed_in(server, "ignite", "ignite")
    t = _name("shared")
    _update(client, f"CREATE TABLE {t} (id BIGINT PRIMARY KEY, name VARCHAR)", options)
    _update(client, f"INSERT INTO {t} VALUES (1, 'a'), (2, 'b')", options)
    return t


def test_reader_may_select(server, shared_table):
    client, options = _signed_in(server, "rd", "read-only")
    assert _query(client, f"SELECT count(*) AS n FROM {shared_table}", options).column("n").to_pylist() == [2]


@pytest.mark.parametrize("how, sql", [
    ("query", "CREATE TABLE {new} (a INT)"), ("query", "INSERT INTO {t} VALUES (9, 'x')"),
    ("query", "DELETE FROM {t}"), ("query", "SELECT 1; DROP TABLE {t}"),
    ("update", "CREATE TABLE {new} (a INT)"), ("update", "INSERT INTO {t} VALUES (9, 'x')"),
    ("update", "DELETE FROM {t}"), ("update", "UPDATE {t} SET name = 'z'"), ("ingest", None),
])
def test_reader_is_refused_every_write_with_permission_denied(server, shared_table, how, sql):
    client, options = _signed_in(server, "rd", "read-only")
    with pytest.raises(flight.FlightUnauthorizedError, match="'rd' \\(reader\\) may not write"):
        if how == "query":
            _query(client, sql.format(t=shared_table, new=_name("nope")), options)
        elif how == "update":
            _update(client, sql.format(t=shared_table, new=_name("nope")), options)
        else:
            _ingest(client, shared_table, pa.table({"id": [7], "name": ["x"]}), options)
    admin, admin_options = _signed_in(server, "ignite", "ignite")
    assert _query(admin, f"SELECT id FROM {shared_table} ORDER BY id", admin_options).column("id").to_pylist() == [1, 2]


def test_concurrent_calls_beyond_the_cap_are_refused_as_busy_then_served_again(tmp_path):
    with GridServer(tmp_path, memory_limit="256MB", threads=1,
                    **auth.server_options(USERS, max_calls=1)) as s:
        client, options = _signed_in(s, "ignite", "ignite")
        info = client.get_flight_info(flight.FlightDescriptor.for_command(sqlproto.pack(
            sqlproto.CommandStatementQuery(query="SELECT range AS x, repeat('y', 1000) AS pad FROM range(200000)"))),
            options)
        stream = client.do_get(info.endpoints[0].ticket, options)  # held open: the server is mid-stream
        stream.read_chunk()
        with pytest.raises(flight.FlightUnavailableError, match="server busy"):
            _query(_client(s), "SELECT 1", options)
        rest = stream.read_all()
        assert rest.num_rows > 0
        deadline = time.monotonic() + 5
        while True:  # the stream's end reaches the server a moment after the client has read it
            try:
                assert _query(client, "SELECT 1", options).num_rows == 1
                break
            except flight.FlightUnavailableError:
                assert time.monotonic() < deadline
                time.sleep(0.05)


# -- a client nobody here wrote: the ADBC Flight SQL driver (Go, sends Basic without base64 padding) --------

def test_adbc_driver_signs_in_with_db_kwargs_and_writes_as_admin(server):
    t = _name("adbc")
    with flight_sql.connect(server.url, db_kwargs={"username": "ignite", "password": "ignite"},
                            autocommit=True) as conn:
        cur = conn.cursor()
        cur.execute(f"CREATE TABLE {t} (id BIGINT PRIMARY KEY, name VARCHAR)")
        cur.execute(f"INSERT INTO {t} VALUES (1, 'WARM KITTY'), (2, 'SOFT KITTY')")
        cur.adbc_ingest(t, pa.table({"id": [3], "name": ["PURR"]}), mode="append")
        cur.execute(f"SELECT name FROM {t} WHERE id = ?", parameters=(2,))
        assert cur.fetch_arrow_table().column("name").to_pylist() == ["SOFT KITTY"]
        cur.close()


def test_adbc_driver_with_a_wrong_password_or_none_is_unauthenticated(server):
    for kwargs in ({"username": "ignite", "password": "nope"}, {}):
        with pytest.raises(flight_sql.Error, match="UNAUTHENTICATED"):
            with flight_sql.connect(server.url, db_kwargs=kwargs, autocommit=True) as conn:
                cur = conn.cursor()
                cur.execute("SELECT 1")
                cur.fetchall()


def test_adbc_reader_may_select_but_not_ingest_or_bind_an_insert(server, shared_table):
    with flight_sql.connect(server.url, db_kwargs={"username": "rd", "password": "read-only"},
                            autocommit=True) as conn:
        cur = conn.cursor()
        cur.execute(f"SELECT count(*) FROM {shared_table}")
        assert cur.fetchall() == [(2,)]
        with pytest.raises(flight_sql.Error, match="may not write"):
            cur.adbc_ingest(shared_table, pa.table({"id": [5], "name": ["x"]}), mode="append")
        with pytest.raises(flight_sql.Error, match="may not write"):
            cur.execute(f"INSERT INTO {shared_table} VALUES (?, 'x')", parameters=(6,))
        cur.close()


@pytest.mark.parametrize("sql", ["INSERT INTO {t} VALUES (8, 'x')", "DELETE FROM {t}", "CREATE TABLE {new} (a INT)"])
def test_adbc_reader_is_refused_unparameterised_writes(server, sql):
    admin, options = _signed_in(server, "ignite", "ignite")
    t = _name("victim")
    _update(admin, f"CREATE TABLE {t} AS SELECT 1 AS id, 'a' AS name", options)
    with flight_sql.connect(server.url, db_kwargs={"username": "rd", "password": "read-only"},
                            autocommit=True) as conn:
        cur = conn.cursor()
        try:
            with pytest.raises(flight_sql.Error, match="may not write"):
                cur.execute(sql.format(t=t, new=_name("nope")))
        finally:
            cur.close()
    assert _query(admin, f"SELECT count(*) AS n FROM {t}", options).column("n").to_pylist() == [1]


def test_reader_cannot_run_a_prepared_write_through_get_flight_info(server):
    admin, admin_options = _signed_in(server, "ignite", "ignite")
    t = _name("victim")
    _update(admin, f"CREATE TABLE {t} AS SELECT 1 AS id", admin_options)
    client, options = _signed_in(server, "rd", "read-only")
    try:
        request = sqlproto.ActionCreatePreparedStatementRequest(query=f"DELETE FROM {t}")
        [result] = client.do_action(flight.Action("CreatePreparedStatement", sqlproto.pack(request)), options)
        handle = sqlproto.unpack(result.body.to_pybytes()).prepared_statement_handle
        command = sqlproto.CommandPreparedStatementQuery(prepared_statement_handle=handle)
        info = client.get_flight_info(flight.FlightDescriptor.for_command(sqlproto.pack(command)), options)
        client.do_get(info.endpoints[0].ticket, options).read_all()
    except flight.FlightUnauthorizedError:
        pass
    assert _query(admin, f"SELECT count(*) AS n FROM {t}", admin_options).column("n").to_pylist() == [1]


def test_a_reader_cannot_run_a_write_someone_else_prepared(server):
    """Handles are not secrets to rely on: running a prepared write checks the caller's right too."""
    admin, admin_options = _signed_in(server, "ignite", "ignite")
    t = _name("victim")
    _update(admin, f"CREATE TABLE {t} AS SELECT 1 AS id", admin_options)
    request = sqlproto.ActionCreatePreparedStatementRequest(query=f"DELETE FROM {t}")
    [result] = admin.do_action(flight.Action("CreatePreparedStatement", sqlproto.pack(request)), admin_options)
    handle = sqlproto.unpack(result.body.to_pybytes()).prepared_statement_handle
    client, options = _signed_in(server, "rd", "read-only")
    command = sqlproto.CommandPreparedStatementQuery(prepared_statement_handle=handle)
    with pytest.raises(flight.FlightUnauthorizedError, match="may not write"):
        client.get_flight_info(flight.FlightDescriptor.for_command(sqlproto.pack(command)), options)
    update = sqlproto.CommandPreparedStatementUpdate(prepared_statement_handle=handle)
    with pytest.raises(flight.FlightUnauthorizedError, match="may not write"):
        writer, _ = client.do_put(flight.FlightDescriptor.for_command(sqlproto.pack(update)), pa.schema([]),
                                  options)
        writer.close()  # a DoPut's refusal arrives when the stream is closed
    assert _query(admin, f"SELECT count(*) AS n FROM {t}", admin_options).column("n").to_pylist() == [1]
