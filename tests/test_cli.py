"""The tensorgrid command, run as a real process: output, exit codes, one-line errors."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import tensorgrid as tg


def run(*args, cwd=None, timeout=120):
    p = subprocess.run([sys.executable, "-m", "tensorgrid.cli", *args], capture_output=True, text=True, cwd=cwd,
                       timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def test_quickstart_writes_digits_into_its_own_folder_and_destroys_nothing_else(tmp_path):
    # a user's own 2-version dataset and run folder where the README's usage section puts them
    mine = tg.write(str(tmp_path / "grid" / "digits"), pd.DataFrame({"x": [1, 2]}))
    tg.write(mine.url, pd.DataFrame({"x": [3]}), mode="append")
    (tmp_path / "grid" / "runs" / "digits").mkdir(parents=True)
    (tmp_path / "grid" / "runs" / "digits" / "notes.txt").write_text("mine")

    code, out, err = run("quickstart", cwd=tmp_path)
    assert code == 0, err
    home = tmp_path / "grid" / "quickstart"
    ds = tg.open(str(home / "digits"))
    assert ds.num_rows == 1797
    assert ds.schema.field("image").type.shape == [8, 8]
    assert "1,797" in out and "verified" in out and "Try next" in out
    assert "batch 0: image (256, 8, 8) torch.uint8" in out
    acc = float(out.split("held-out accuracy ")[1].split()[0])
    assert acc >= 0.95
    ckpts = list((home / "runs" / "digits" / "checkpoints").glob("ckpt-*.pt"))
    events = list((home / "runs" / "digits" / "tensorboard").glob("events.out.tfevents*"))
    assert ckpts and events and "tensorboard --logdir" in out
    png = home / "runs" / "digits" / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"{png}" in out
    # the "try next" commands run as printed (this test's tensorgrid is not on PATH: printed with its path)
    tried = [line.strip() for line in out.split("Try next")[1].splitlines()[1:] if line.strip()]
    assert tried and all(subprocess.run(c, shell=True, cwd=tmp_path, capture_output=True).returncode == 0
                         for c in tried), tried
    # a second run replaces only its own folder; a plain glob over its shards reads the current version
    code, _, err = run("quickstart", "--no-train", cwd=tmp_path)
    assert code == 0, err
    import duckdb

    n = duckdb.sql(f"SELECT count(*) FROM read_parquet('{home}/digits/**/*.parquet')").fetchall()[0][0]
    assert n == 1797
    assert [v.version for v in tg.open(mine.url).versions()] == [1, 2] and tg.open(mine.url).num_rows == 3
    assert (tmp_path / "grid" / "runs" / "digits" / "notes.txt").read_text() == "mine"
    # a folder named quickstart that the demo did not make is refused, untouched
    (tmp_path / "other" / "quickstart").mkdir(parents=True)
    (tmp_path / "other" / "quickstart" / "thesis.tex").write_text("years of work")
    code, out, err = run("quickstart", "--root", "other", "--no-train", cwd=tmp_path)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "other/quickstart exists and was not made by the quickstart" in err and "--overwrite" in err
    assert (tmp_path / "other" / "quickstart" / "thesis.tex").read_text() == "years of work"


def test_ingest_csv_parquet_jsonl_and_images(tmp_path):
    pd.DataFrame({"a": range(100), "b": ["x"] * 100}).to_csv(tmp_path / "in.csv", index=False)
    code, out, err = run("ingest", str(tmp_path / "in.csv"), str(tmp_path / "c"))
    assert code == 0, err
    assert tg.open(str(tmp_path / "c")).to_pandas()["a"].tolist() == list(range(100))

    pd.DataFrame({"a": range(10)}).to_parquet(tmp_path / "in.parquet")
    assert run("ingest", str(tmp_path / "in.parquet"), str(tmp_path / "p"))[0] == 0
    assert tg.open(str(tmp_path / "p")).num_rows == 10
    code, out, _ = run("ingest", str(tmp_path / "in.parquet"), str(tmp_path / "p"), "--mode", "append")
    assert code == 0 and "ingested 10 rows" in out and "(20 in all)" in out
    assert tg.open(str(tmp_path / "p")).num_rows == 20

    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps({"k": i, "v": [i, i]}) for i in range(5)))
    assert run("ingest", str(tmp_path / "in.jsonl"), str(tmp_path / "j"))[0] == 0
    assert tg.open(str(tmp_path / "j")).to_pandas()["k"].tolist() == list(range(5))

    (tmp_path / "imgs" / "a").mkdir(parents=True)
    for i in range(3):
        buf = io.BytesIO()
        Image.fromarray(np.full((4, 4), i, np.uint8)).save(buf, format="PNG")
        (tmp_path / "imgs" / "a" / f"{i}.png").write_bytes(buf.getvalue())
    (tmp_path / "imgs" / "a" / "bad.png").write_bytes(b"nope")
    code, out, err = run("ingest", str(tmp_path / "imgs"), str(tmp_path / "i"))
    assert code == 0, err
    assert "skipped 1 of 4" in err and "a/bad.png" in err
    assert tg.open(str(tmp_path / "i")).num_rows == 3


def test_info_head_versions_verify_ls_sql_vacuum(tmp_path):
    url = str(tmp_path / "root" / "d")
    tg.write(url, pd.DataFrame({"x": np.arange(10), "img": list(np.zeros((10, 2, 2), np.uint8))}))
    tg.write(url, pd.DataFrame({"x": [99], "img": [np.ones((2, 2), np.uint8)]}), mode="append")
    code, out, _ = run("info", url)
    assert code == 0 and "11" in out and "uint8" in out
    code, out, _ = run("head", url, "-n", "3")
    assert code == 0 and "uint8[2x2]" in out
    code, out, _ = run("versions", url)
    assert code == 0 and "append" in out and "create" in out
    code, out, _ = run("verify", url)
    assert code == 0 and out.startswith("ok: 2 shards")
    code, out, _ = run("ls", str(tmp_path / "root"))
    assert code == 0 and url in out
    code, out, _ = run("sql", "SELECT max(x) AS m FROM d", "--ds", f"d={url}")
    assert code == 0 and "99" in out
    code, out, _ = run("vacuum", url, "--min-age", "0")
    assert code == 0 and "removed 0" in out


@pytest.mark.parametrize("args, needle", [
    (("info", "/no/such/ds"), "no dataset"),
    (("info", "zzz://x"), "unknown URL scheme"),
    (("sql", "SELECT * FROM nope"), "nope"),
    (("sql", "SELECT 1", "--ds", "bad"), "name=url"),
    (("ingest", "/no/such.csv", "/tmp/x"), "nothing at"),
    (("head", "{tmp}", "-n", "1"), "neither Parquet nor CSV"),
    (("sql", "SELECT 1", "--ds", "d={tmp}/a", "--ds", "d={tmp}/b"), "twice"),
    (("sql", "SELECT 1", "--limit", "-1"), "--limit"),
    (("sql", ""), "non-empty"),
    (("ingest", "{tmp}/notes.txt", "{tmp}/x", "--shard-mb", "0"), "--shard-mb"),
    (("ingest", "{tmp}/mixed", "{tmp}/x"), "mixes Parquet"),
    (("ingest", "{tmp}/header.csv", "{tmp}/x"), "header.csv holds no rows"),
])
def test_bad_input_is_one_line_without_traceback(args, needle, tmp_path):
    (tmp_path / "notes.txt").write_text("not data")
    if "{tmp}/header.csv" in args:
        (tmp_path / "header.csv").write_text("a,b\n")
    if "{tmp}/mixed" in args:
        (tmp_path / "mixed").mkdir()
        pd.DataFrame({"a": [1]}).to_csv(tmp_path / "mixed" / "a.csv", index=False)
        pd.DataFrame({"a": [1]}).to_parquet(tmp_path / "mixed" / "b.parquet")
    code, out, err = run(*(a.format(tmp=tmp_path) for a in args))
    assert code != 0
    assert needle in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_verify_fails_with_nonzero_exit_on_corruption(tmp_path):
    url = str(tmp_path / "d")
    ds = tg.write(url, pd.DataFrame({"x": np.arange(1000)}))
    p = ds.shard_urls()[0]
    data = bytearray(open(p, "rb").read())
    data[-100] ^= 0xFF
    open(p, "wb").write(bytes(data))
    code, out, err = run("verify", url)
    assert code == 1 and "corrupt" in err and os.path.basename(p) in err and "Traceback" not in err


@pytest.mark.parametrize("args, needle", [
    (("head", "{tmp}/d", "-n", "99999999999999999999999"), "-n must be an int in [0, 9223372036854775807]"),
    (("head", "{tmp}/d", "-n", "-1"), "-n must be an int"),
    (("info", "{tmp}/d", "--version", "99999999999999999999"), "--version must be an int"),
    (("sql", "SELECT 1", "--limit", "99999999999999999999"), "--limit must be an int"),
    (("ingest", "{tmp}/in.csv", "{tmp}/x", "--shard-mb", "nan"), "--shard-mb must be a finite number"),
    (("ingest", "{tmp}/in.csv", "{tmp}/x", "--shard-mb", "inf"), "--shard-mb must be a finite number"),
    (("ingest", "{tmp}/in.csv", "{tmp}/x", "--shard-mb", "1e300"), "--shard-mb must be a finite number"),
    (("vacuum", "{tmp}/d", "--min-age", "nan"), "--min-age must be a finite number"),
    (("ingest", "{tmp}/in.csv", "{tmp}/" + "n" * 300), "File name too long: {tmp}/nnn"),
    (("ingest", "{tmp}/in.csv", "{tmp}/in.csv/sub"), "Not a directory: {tmp}/in.csv/sub"),
    (("head", "{tmp}/d", "-n"), "argument -n: expected one argument"),
    (("head",), "the following arguments are required: ds"),
    (("ingest", "{tmp}/in.csv", "{tmp}/x", "--mode", "upsert"), "invalid choice: 'upsert'"),
    (("nosuchcommand",), "invalid choice: 'nosuchcommand'"),
    (("info", "{tmp}/a\nb\x1b[31m"), " at {tmp}/a b\\x1b[31m"),  # a newline and an escape sequence: one line
])
def test_hostile_arguments_are_one_line_errors(args, needle, tmp_path):
    pd.DataFrame({"a": [1, 2]}).to_csv(tmp_path / "in.csv", index=False)
    tg.write(str(tmp_path / "d"), pd.DataFrame({"x": [1, 2]}))
    code, out, err = run(*(a.format(tmp=tmp_path) for a in args))
    assert code != 0, out
    assert err.startswith("error: ") and needle.format(tmp=tmp_path) in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and "\x1b" not in err
    assert not (tmp_path / "x").exists()


def test_data_and_paths_are_printed_literally(tmp_path):
    """Brackets in values, column names and paths are text, not rich markup (which raised MarkupError)."""
    url = str(tmp_path / "[/]ds")
    tg.write(url, pd.DataFrame({"[bold]col": ["[/]value", "[red]x"]}))
    code, out, err = run("head", url)
    assert code == 0, err
    assert "[/]value" in out and "[red]x" in out and "[bold]col" in out and url in out
    code, out, err = run("ls", str(tmp_path))
    assert code == 0 and url in out, err


def test_any_command_line_gives_exit_0_or_one_error_line(tmp_path_factory, monkeypatch, capsys):
    """Random and hostile argument lists, in process: exit code 0, or a one-line ``error:`` and a non-zero
    exit; never a traceback, an escaping exception or a message that says it is a bug."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from tensorgrid.cli import main

    ws = tmp_path_factory.mktemp("cli-fuzz")
    monkeypatch.chdir(ws)  # every relative path (and every dataset ingest writes) stays in here
    tg.write("d", pd.DataFrame({"x": np.arange(10), "s": ["[/]a"] * 10, "img": list(np.zeros((10, 2, 2), np.uint8))}))
    pd.DataFrame({"a": [1, 2]}).to_csv("in.csv", index=False)
    pd.DataFrame({"a": [1, 2]}).to_parquet("in.parquet")
    (ws / "imgs" / "c").mkdir(parents=True)
    buf = io.BytesIO()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(buf, format="PNG")
    (ws / "imgs" / "c" / "0.png").write_bytes(buf.getvalue())
    (ws / "notes.txt").write_text("x")

    # free text never holds "/" or "~" and is never "." or "..": nothing outside the workspace is touched
    text = st.text(st.characters(blacklist_characters="/~"), max_size=30).filter(lambda t: t not in (".", ".."))
    num = st.one_of(st.sampled_from(["nan", "inf", "-inf", "1e300", "-1", "0", "1", "3", "99999999999999999999999",
                                     "0x10", "1_000", "", "1.5", "-0"]), text)
    path = st.one_of(st.sampled_from(["d", "in.csv", "in.parquet", "imgs", "notes.txt", "missing", "n" * 300, "[/]",
                                      "\udcff", "a\x00b", "memory://cli-fuzz/ds", f"file://{ws}/d", ""]), text)

    def opt(flag, values):
        return st.one_of(st.just([]), values.map(lambda v: [flag, v]))

    def command(name, *parts):
        return st.tuples(*parts).map(lambda ps: [name] + [x for p in ps for x in (p if isinstance(p, list) else [p])])

    tokens = st.one_of(st.sampled_from(["-n", "--limit", "--version", "--shard-mb", "--min-age", "--mode", "--ds",
                                        "--", "-", "-h", "d", "imgs"]), num, path)
    argv = st.one_of(
        command("info", path, opt("--version", num)), command("verify", path, opt("--version", num)),
        command("head", path, opt("-n", num), opt("--version", num)), command("versions", path),
        command("ls", path), command("vacuum", path, opt("--min-age", num)),
        command("sql", st.one_of(st.sampled_from(["SELECT * FROM d", "SELECT s, img FROM d", "SELECT 1/0", "SELECT",
                                                  "SELECT '[/]'", "SELECT * FROM t", "SELECT '\udcff'"]), text),
                st.lists(st.one_of(path.map("d={}".format), path.map("t={}".format), text), max_size=2).map(
                    lambda ds: [x for v in ds for x in ("--ds", v)]), opt("--limit", num)),
        command("ingest", path, st.one_of(st.sampled_from(["out1", "out2", "n" * 300, "d", "in.csv", "[/]o"]), text),
                opt("--mode", st.sampled_from(["create", "append", "overwrite", "upsert"])), opt("--shard-mb", num)),
        st.tuples(st.sampled_from(["info", "head", "sql", "ingest", "ls", "vacuum", "bogus", "", "--help"]),
                  st.lists(tokens, max_size=6)).map(lambda t: [t[0], *t[1]]))

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(argv)
    def check(args):
        code = main(args)
        err = capsys.readouterr().err
        assert "Traceback" not in err, (args, err)
        if code != 0:
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: "), (args, err)
            assert "internal error" not in err, (args, err)

    check()


def test_ingest_of_an_image_folder_with_a_fifo_and_symlink_loops_never_blocks(tmp_path):
    imgs = tmp_path / "imgs" / "a"
    imgs.mkdir(parents=True)
    buf = io.BytesIO()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(buf, format="PNG")
    (imgs / "0.png").write_bytes(buf.getvalue())
    os.mkfifo(imgs / "pipe")  # no extension: sniffing it for Parquet would open it and wait for a writer
    os.symlink("..", imgs / "up")
    os.symlink("nowhere.png", imgs / "gone.png")
    try:
        code, out, err = run("ingest", str(tmp_path / "imgs"), str(tmp_path / "out"), timeout=60)
    except subprocess.TimeoutExpired:  # (subprocess.run killed it)
        pytest.fail("ingest blocked on a FIFO")
    assert code == 0, err
    assert "ingested 1 rows" in out and "(images)" in out
    assert "skipped 3 of 4" in err and "a/pipe" in err and "a/up" in err and "a/gone.png" in err


def test_vacuum_cleans_a_folder_holding_only_an_interrupted_first_write(tmp_path):
    (tmp_path / "d" / "_tensorgrid").mkdir(parents=True)
    (tmp_path / "d" / "data").mkdir()
    (tmp_path / "d" / "data" / "part-0123456789ab-00000.parquet").write_bytes(b"half")
    code, out, err = run("vacuum", str(tmp_path / "d"), "--min-age", "0")
    assert code == 0 and "removed 1" in out, err
    code, _, err = run("vacuum", str(tmp_path / "nothing"))
    assert code != 0 and err.startswith("error:") and "no TensorGrid dataset" in err


def cli(capsysbinary, *args):
    """The command in this process: exit code, stdout bytes, stderr text."""
    from tensorgrid.cli import main

    code = main([str(a) for a in args])
    cap = capsysbinary.readouterr()
    return code, cap.out, cap.err.decode()


@pytest.fixture
def small(tmp_path):
    url = str(tmp_path / "d")
    tg.write(url, pd.DataFrame({"id": np.arange(5), "label": ["a", "b", "a", "c", "b"],
                                "img": list(np.arange(20, dtype=np.uint8).reshape(5, 2, 2)), "raw": [b"\x00\xff"] * 5}))
    return url


def test_sql_prints_csv_and_json_lines_that_pipe(small, tmp_path):
    code, out, err = run("sql", "SELECT id, label, img, raw FROM d ORDER BY id", "--ds", f"d={small}", "--format", "csv")
    assert code == 0, err
    df = pd.read_csv(io.StringIO(out))
    assert df["id"].tolist() == list(range(5)) and df["label"].tolist() == ["a", "b", "a", "c", "b"]
    assert json.loads(df["img"][1]) == [[4, 5], [6, 7]] and df["raw"][0] == "AP8="  # tensors as arrays, bytes base64
    # two tables in one --ds, and the query after the tables
    code, out, err = run("sql", "--ds", f"a={small}", f"b={small}", "SELECT a.id FROM a JOIN b USING (id) ORDER BY 1",
                         "--format", "json")
    assert code == 0, err
    assert [json.loads(line) for line in out.splitlines()] == [{"id": i} for i in range(5)]


def test_sql_out_writes_a_dataset_and_refuses_to_replace_one_without_mode(small, tmp_path, capsysbinary):
    dest = tmp_path / "threes"
    q = "SELECT * FROM d WHERE label = 'a'"
    code, out, err = cli(capsysbinary, "sql", q, "--ds", f"d={small}", "--out", dest)
    assert code == 0 and "wrote 2 rows" in err, err
    assert tg.open(str(dest)).schema == tg.open(small).schema and tg.open(str(dest)).num_rows == 2
    code, _, err = cli(capsysbinary, "sql", q, "--ds", f"d={small}", "--out", dest)
    assert code == 1 and err.count("\n") == 1 and str(dest) in err and "--mode append" in err and "--mode overwrite" in err
    assert tg.open(str(dest)).version == 1  # untouched
    assert cli(capsysbinary, "sql", q, "--ds", f"d={small}", "--out", dest, "--mode", "append")[0] == 0
    assert tg.open(str(dest)).num_rows == 4
    assert cli(capsysbinary, "sql", "SELECT * FROM d", "--ds", f"d={small}", "--out", dest, "--mode", "overwrite")[0] == 0
    assert tg.open(str(dest)).num_rows == 5 and tg.open(str(dest), version=2).num_rows == 4  # older versions stay
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.csv").write_text("a\n1\n")
    for mode in ("create", "append", "overwrite"):  # a folder of the user's own files is never written into
        code, _, err = cli(capsysbinary, "sql", q, "--ds", f"d={small}", "--out", tmp_path / "mine", "--mode", mode)
        assert code == 1 and "not a TensorGrid dataset" in err, err
    assert os.listdir(tmp_path / "mine") == ["notes.csv"]


def test_sql_out_file_writes_parquet_csv_json_and_refuses_to_replace_a_file(small, tmp_path, capsysbinary):
    pq_file = tmp_path / "r.parquet"
    code, _, err = cli(capsysbinary, "sql", "SELECT * FROM d", "--ds", f"d={small}", "--out-file", pq_file)
    assert code == 0, err
    back = tg.open(str(pq_file)).to_pandas()  # tensors keep their shape
    assert back["img"][4].shape == (2, 2) and back["img"][4][1, 1] == 19 and back["raw"][0] == b"\x00\xff"
    code, _, err = cli(capsysbinary, "sql", "SELECT 1 AS x", "--out-file", pq_file)
    assert code == 1 and str(pq_file) in err and "--mode overwrite" in err
    assert tg.open(str(pq_file)).num_rows == 5  # untouched
    assert cli(capsysbinary, "sql", "SELECT 1 AS x", "--out-file", pq_file, "--mode", "overwrite")[0] == 0
    assert tg.open(str(pq_file)).to_pandas()["x"].tolist() == [1]
    assert cli(capsysbinary, "sql", "SELECT 2 AS x", "--out-file", tmp_path / "r.jsonl")[0] == 0
    assert (tmp_path / "r.jsonl").read_text() == '{"x": 2}\n'
    code, _, err = cli(capsysbinary, "sql", "SELECT 2 AS x", "--out-file", tmp_path / "r.txt")
    assert code == 1 and "--format csv, json or parquet" in err
    assert cli(capsysbinary, "sql", "SELECT 2 AS x", "--out-file", tmp_path / "r.txt", "--format", "csv")[0] == 0
    assert (tmp_path / "r.txt").read_text() == '"x"\n2\n'
    code, _, err = cli(capsysbinary, "sql", "--ds", f"d={small}")
    assert code == 1 and "sql needs a query" in err


def test_ingest_never_replaces_a_dataset_or_the_users_files_unasked(small, tmp_path, capsysbinary):
    src = tmp_path / "in.csv"
    pd.DataFrame({"id": [9], "label": ["z"]}).to_csv(src, index=False)
    other = str(tmp_path / "other")
    tg.write(other, pd.DataFrame({"id": [1], "label": ["q"]}))
    code, _, err = cli(capsysbinary, "ingest", src, other)
    assert code == 1 and other in err and "--mode append" in err and "--mode overwrite" in err
    assert tg.open(other).version == 1
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    code, _, err = cli(capsysbinary, "ingest", src, notes)  # a file is no dataset folder
    assert code == 1 and "is a file" in err and notes.read_text() == "mine"
    for mode in ("create", "append", "overwrite"):  # nor is a folder of the user's own files
        code, _, err = cli(capsysbinary, "ingest", src, tmp_path, "--mode", mode)
        assert code == 1 and "not a TensorGrid dataset" in err, (mode, err)
    assert notes.read_text() == "mine" and not (tmp_path / "_tensorgrid").exists()
    assert cli(capsysbinary, "ingest", src, other, "--mode", "overwrite")[0] == 0
    assert tg.open(other).to_pandas()["id"].tolist() == [9] and tg.open(other, version=1).num_rows == 1


def test_vacuum_keeps_files_tensorgrid_did_not_write_unless_asked(small, tmp_path, capsysbinary):
    mine = os.path.join(small, "data", "keep", "notes.txt")
    os.makedirs(os.path.dirname(mine))
    with open(mine, "w") as f:
        f.write("mine")
    orphan = os.path.join(small, "data", "part-0123456789ab-00000.parquet")  # a killed writer's shard
    with open(orphan, "wb") as f:
        f.write(b"half")
    code, out, err = cli(capsysbinary, "vacuum", small, "--min-age", "0")
    assert code == 0 and b"removed 1 " in out and b"kept 1 file(s) TensorGrid did not write (data/keep/notes.txt)" \
        in out and b"--delete-unknown" in out, err
    assert os.path.exists(mine) and not os.path.exists(orphan)  # the user's file kept, the orphan shard gone
    assert tg.vacuum(small, min_age_s=0)["unknown"] == ["data/keep/notes.txt"]  # the library keeps it too
    assert os.path.exists(mine)
    assert cli(capsysbinary, "vacuum", small, "--min-age", "0", "--delete-unknown")[0] == 0
    assert not os.path.exists(mine) and tg.open(small).num_rows == 5


def test_sql_out_file_never_replaces_a_device_fifo_or_what_a_link_points_past(small, tmp_path, capsysbinary):
    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)
    code, _, err = cli(capsysbinary, "sql", "SELECT 1 AS x", "--out-file", fifo, "--mode", "overwrite")
    assert code == 1 and err.count("\n") == 1 and "not a regular file" in err and str(fifo) in err
    assert __import__("stat").S_ISFIFO(os.stat(fifo).st_mode)  # still the pipe, not a file put in its place
    real = tmp_path / "real.csv"
    real.write_text("old\n")
    (tmp_path / "link.csv").symlink_to(real)
    assert cli(capsysbinary, "sql", "SELECT 1 AS x", "--out-file", tmp_path / "link.csv", "--mode", "overwrite")[0] == 0
    assert (tmp_path / "link.csv").is_symlink() and real.read_text() == '"x"\n1\n'  # written through the link


def test_sql_out_file_into_a_missing_folder_is_refused_before_any_work(small, tmp_path, capsysbinary):
    dest = tmp_path / "out"
    code, _, err = cli(capsysbinary, "sql", "SELECT * FROM d", "--ds", f"d={small}", "--out", dest,
                       "--out-file", tmp_path / "nodir" / "x.csv")
    assert code == 1 and err.count("\n") == 1 and "no folder" in err and str(tmp_path / "nodir") in err
    assert ".tmp-" not in err and not dest.exists()  # the dataset was not written either


def test_sql_format_that_contradicts_the_out_file_extension_is_refused(small, tmp_path, capsysbinary):
    code, _, err = cli(capsysbinary, "sql", "SELECT 1 AS x", "--out-file", tmp_path / "r.parquet", "--format", "csv")
    assert code == 1 and "--format csv" in err and "parquet" in err and not (tmp_path / "r.parquet").exists()


def test_sql_out_file_over_the_size_limit_leaves_no_file_and_stdout_full_is_one_line(small, tmp_path):
    import resource
    import signal

    def small_files():  # a disk that fills after 4 KiB (EFBIG instead of ENOSPC: the same failed write)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    args = [sys.executable, "-m", "tensorgrid.cli", "sql", "SELECT range AS i, 'padding padding' AS s FROM range(5000)",
            "--out-file", str(tmp_path / "big.csv")]
    p = subprocess.run(args, capture_output=True, text=True, preexec_fn=small_files, timeout=120)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, p.stderr
    assert os.listdir(tmp_path) == ["d"]  # neither big.csv nor its temporary
    with open(os.devnull if not os.path.exists("/dev/full") else "/dev/full", "wb") as full:
        p = subprocess.run([sys.executable, "-m", "tensorgrid.cli", "sql", "SELECT * FROM range(100000)",
                            "--format", "csv"], stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)
    if os.path.exists("/dev/full"):
        assert p.returncode == 1 and p.stderr.startswith("error: No space left on device") and "[Errno" not in p.stderr


def test_sql_json_lines_hold_no_nan_or_infinity(tmp_path, capsysbinary):
    code, out, err = cli(capsysbinary, "sql", "SELECT 'nan'::DOUBLE AS a, 'inf'::DOUBLE AS b, [1.0, '-inf'::DOUBLE] AS c",
                         "--format", "json")
    assert code == 0, err
    assert json.loads(out, parse_constant=lambda c: pytest.fail(f"{c} is not JSON")) == {"a": None, "b": None,
                                                                                         "c": [1.0, None]}
