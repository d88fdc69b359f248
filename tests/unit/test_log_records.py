"""Log records and files (shoal.observability.logs) and reading them back (shoal.cli.logs)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from shoal.cli.logs import Follower, catalog, tail_lines
from shoal.context import RequestContext, _request_ctx
from shoal.observability.logs import (
    Identity,
    JSONFormatter,
    LogFile,
    RecordContext,
    TextFormatter,
    is_live,
    log_access,
    prune,
    replica_log_path,
    safe_name,
)

WHO = Identity("replica", "Model-ab12", "shop", "Model")


class Collect(logging.Handler):
    def __init__(self, fmt: logging.Formatter) -> None:
        super().__init__()
        self.setFormatter(fmt)
        self.addFilter(RecordContext(WHO))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def collect() -> object:
    handlers: list[tuple[logging.Logger, Collect]] = []

    def attach(fmt: logging.Formatter, name: str = "user.module") -> Collect:
        log = logging.getLogger(name)
        h = Collect(fmt)
        log.addHandler(h)
        log.setLevel(logging.DEBUG)
        handlers.append((log, h))
        return h

    yield attach
    for log, h in handlers:
        log.removeHandler(h)
        log.setLevel(logging.NOTSET)


def test_text_lines_carry_identity_and_request_id(collect) -> None:  # type: ignore[no-untyped-def]
    h = collect(TextFormatter(WHO))
    token = _request_ctx.set(RequestContext("req-42", route="/shop"))
    try:
        logging.getLogger("user.module").info("scoring %d items", 3)
        try:
            raise ValueError("bad\ninput")
        except ValueError:
            logging.getLogger("user.module").exception("it failed")
    finally:
        _request_ctx.reset(token)
    logging.getLogger("user.module").info("between requests")
    first, failed, idle = h.lines
    assert "INFO replica shop/Model/Model-ab12 pid=" in first
    assert "user.module request_id=req-42: scoring 3 items" in first
    assert "\n" not in failed and "Traceback" in failed and "ValueError: bad\\ninput" in failed
    assert "request_id" not in idle and idle.endswith("user.module: between requests")


def test_text_multiline_for_the_terminal(collect) -> None:  # type: ignore[no-untyped-def]
    h = collect(TextFormatter(WHO, one_line=False, extra_attrs=["lineno"]))
    logging.getLogger("user.module").warning("two\nlines")
    assert h.lines[0].endswith("two\nlines") and " lineno=" in h.lines[0]


def test_json_records_and_access_log_fields(collect) -> None:  # type: ignore[no-untyped-def]
    user = collect(JSONFormatter(WHO, extra_attrs=["funcName"]))
    access = collect(JSONFormatter(WHO), "shoal.access")
    token = _request_ctx.set(RequestContext("req-7"))
    try:
        logging.getLogger("user.module").warning("hello", extra={"items": 3})
    finally:
        _request_ctx.reset(token)
    log_access("GET", "/shop/cart", 200, time.monotonic() - 0.0015, "req-8", "/shop")
    rec = json.loads(user.lines[0])
    assert rec["message"] == "hello" and rec["levelname"] == "WARNING" and rec["name"] == "user.module"
    assert (rec["application"], rec["deployment"], rec["replica"], rec["request_id"]) == ("shop", "Model", "Model-ab12",
                                                                                         "req-7")
    assert rec["items"] == 3 and rec["funcName"] == "test_json_records_and_access_log_fields"
    acc = json.loads(access.lines[0])
    assert acc["request_id"] == "req-8" and acc["route"] == "/shop"
    assert (acc["method"], acc["path"], acc["status"]) == ("GET", "/shop/cart", 200) and acc["latency_ms"] >= 1.5
    assert acc["message"].startswith("GET /shop/cart 200 ") and acc["message"].endswith("ms")


def test_json_formatter_accepts_a_replica_context() -> None:
    from shoal.context import ReplicaContext

    fmt = JSONFormatter(ReplicaContext("app", "Dep", "Dep-1"))
    rec = json.loads(fmt.format(logging.makeLogRecord({"msg": "x", "levelname": "INFO"})))
    assert (rec["application"], rec["deployment"], rec["replica"], rec["request_id"]) == ("app", "Dep", "Dep-1", "")


def test_paths_are_one_component_per_name(tmp_path: Path) -> None:
    assert safe_name("a/b") == "a_b" and safe_name("..") == "_.." and safe_name("app#canary") == "app#canary"
    path = replica_log_path(str(tmp_path), "x/y", "Dep", "Dep-1")
    assert path == str(tmp_path / "x_y" / "Dep" / "Dep-1.log")


CAPTURE = textwrap.dedent('''
    import logging, os, sys, time
    from shoal.observability import logs
    path = sys.argv[1]
    logs.setup(logs.Identity("replica", "D-1", "app", "D"), path=path, level="INFO")
    log = logging.getLogger("user")
    log.info("info goes to the file only")
    log.warning("warning goes to both")
    print("printed line")
    os.write(2, b"raw stderr bytes\\n")
    # Rotation: small limit, many lines; stdout must follow the new file.
    handler = logs._current
    handler.maxBytes = 4000
    handler.check_every = 1
    for i in range(200):
        log.info("line %03d %s", i, "x" * 40)
    print("after rotation")
    sys.stdout.flush()
''')


def test_process_output_is_captured_rotated_and_warnings_reach_the_terminal(tmp_path: Path) -> None:
    path = tmp_path / "app" / "D" / "D-1.log"
    r = subprocess.run([sys.executable, "-c", CAPTURE, str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    # The terminal (the stderr the process started with) saw the warning, readable, and nothing else.
    assert "warning goes to both" in r.stderr and "info goes" not in r.stderr and "printed" not in r.stderr
    assert r.stdout == ""
    generations = sorted(p.name for p in path.parent.iterdir())
    assert generations == ["D-1.log", "D-1.log.1", "D-1.log.2", "D-1.log.3"]
    assert all(p.stat().st_size < 6000 for p in path.parent.iterdir())
    current = path.read_text()
    assert "after rotation" in current and "line 199" in current
    assert "D-1.log.4" not in generations


def test_first_lines_are_in_the_oldest_kept_generation(tmp_path: Path) -> None:
    path = tmp_path / "D-1.log"
    script = CAPTURE.replace("range(200)", "range(20)")
    r = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    text = "".join(p.read_text() for p in sorted(tmp_path.iterdir(), reverse=True))
    for needle in ("info goes to the file only", "warning goes to both", "printed line", "raw stderr bytes",
                   "after rotation"):
        assert needle in text


FAST = textwrap.dedent('''
    import logging, sys, time
    from shoal.observability import logs
    path, encoding = sys.argv[1], sys.argv[2]
    logs.setup(logs.Identity("replica", "D-1", "app", "D"), path=path, encoding=encoding)
    assert logs._fast is not None
    logs.log_access("GET", "/a\\nb", 200, time.monotonic(), "rid-1", "/a")  # the short cut
    logs.log_access("CALL", "m", "OK", time.monotonic(), "")
    logs.access_logger.addHandler(logging.NullHandler())  # someone else listens: records again
    logs.log_access("GET", "/a\\nb", 200, time.monotonic(), "rid-1", "/a")
    logs.log_access("CALL", "m", "OK", time.monotonic(), "")
''')


def test_access_log_short_cut_writes_what_a_record_would(tmp_path: Path) -> None:
    import re

    for encoding in ("TEXT", "JSON"):
        path = tmp_path / f"{encoding}.log"
        r = subprocess.run([sys.executable, "-c", FAST, str(path), encoding], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, r.stderr
        lines = [re.sub(r"\d+\.\d+ms|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}|\"latency_ms\": [\d.e-]+", "X", x)
                 for x in path.read_text().splitlines()]
        assert len(lines) == 4 and lines[:2] == lines[2:], lines
        assert "\\n" in lines[0]  # one line per event either way


def test_prune_keeps_live_files_and_the_newest_gone_ones(tmp_path: Path) -> None:
    live = LogFile(str(tmp_path / "live.log"))
    try:
        for i in range(5):
            p = tmp_path / f"gone-{i}.log"
            p.write_text("x")
            os.utime(p, (1000 + i, 1000 + i))
        (tmp_path / "gone-0.log.1").write_text("old generation")
        (tmp_path / "notes.txt").write_text("not a log")
        os.utime(tmp_path / "live.log", (1, 1))  # old, but still written by a running process
        assert is_live(str(tmp_path / "live.log")) and not is_live(str(tmp_path / "gone-0.log"))
        prune(str(tmp_path), keep=2)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["gone-3.log", "gone-4.log", "live.log", "notes.txt"]
    finally:
        live.close()
    assert not is_live(str(tmp_path / "live.log"))


def test_prune_follows_links_into_a_logs_dir(tmp_path: Path) -> None:
    own, elsewhere = tmp_path / "own", tmp_path / "elsewhere"
    own.mkdir()
    elsewhere.mkdir()
    for i in range(3):
        target = elsewhere / f"replica_app_D_D-{i}.log"
        target.write_text("x")
        (own / f"D-{i}.log").symlink_to(target)
        os.utime(own / f"D-{i}.log", (1000 + i, 1000 + i), follow_symlinks=False)
    (elsewhere / "someone_elses.log").write_text("keep me")
    prune(str(own), keep=1)
    assert sorted(p.name for p in own.iterdir()) == ["D-2.log"]
    assert sorted(p.name for p in elsewhere.iterdir()) == ["replica_app_D_D-2.log", "someone_elses.log"]


def test_tail_lines(tmp_path: Path) -> None:
    p = tmp_path / "f.log"
    p.write_bytes(b"".join(b"line %d\n" % i for i in range(20000)))
    assert tail_lines(str(p), 3) == ["line 19997", "line 19998", "line 19999"]
    assert len(tail_lines(str(p), None)) == 20000
    assert tail_lines(str(p), 0) == [] and tail_lines(str(tmp_path / "missing"), 5) == []


def test_follower_new_lines_new_files_and_rotation(tmp_path: Path) -> None:
    a = tmp_path / "A-1.log"
    a.write_text("old 1\nold 2\n")

    def files() -> list[str]:
        return sorted(str(p) for p in tmp_path.glob("*.log"))

    f = Follower(files)
    assert f.backlog(1) == [("A-1", "old 2")]
    assert f.poll() == []
    with a.open("a") as out:
        out.write("new 1\npart")
    assert f.poll() == [("A-1", "new 1")]
    with a.open("a") as out:
        out.write("ial\n")
    (tmp_path / "B-2.log").write_text("b started\n")  # a replica that started later
    assert sorted(f.poll()) == [("A-1", "partial"), ("B-2", "b started")]
    with a.open("a") as out:
        out.write("last before rotation\n")
    a.rename(tmp_path / "A-1.log.1")
    a.write_text("first after rotation\n")
    assert f.poll() == [("A-1", "last before rotation"), ("A-1", "first after rotation")]
    f.close()


def test_catalog_lists_deployments_with_files(tmp_path: Path) -> None:
    (tmp_path / "shop" / "Model").mkdir(parents=True)
    (tmp_path / "shop" / "Model" / "Model-1.log").write_text("x")
    (tmp_path / "shop" / "Empty").mkdir()
    (tmp_path / "proxy.log").write_text("x")
    assert catalog(str(tmp_path)) == {"shop/Model": [str(tmp_path / "shop" / "Model" / "Model-1.log")]}


def test_shoal_logs_targets(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from shoal.cli.main import cli

    logs = tmp_path / "logs"
    for app in ("shop", "blog"):
        (logs / app / "Model").mkdir(parents=True)
        (logs / app / "Model" / f"Model-{app}.log").write_text(f"{app} line 1\n{app} line 2\n")
    (logs / "shop" / "Front").mkdir()
    (logs / "shop" / "Front" / "Front-1.log").write_text("front\n")
    (logs / "proxy.log").write_text("proxy says\n")
    (tmp_path / "controller.log").write_text("controller says\n")
    runner = CliRunner()

    def shoal_logs(*args: str) -> tuple[int, str]:
        r = runner.invoke(cli, ["logs", *args, "--address", str(tmp_path)])
        return r.exit_code, r.output

    code, out = shoal_logs()
    assert code == 0 and "shop/Model" in out and "blog/Model" in out and "Model-shop (exited)" in out
    assert "proxy" in out and "controller" in out
    assert shoal_logs("Front") == (0, "[Front-1] front\n")
    assert shoal_logs("shop/Model", "--tail", "1") == (0, "[Model-shop] shop line 2\n")
    code, out = shoal_logs("Model")
    assert code == 1 and "several applications" in out and "blog/Model" in out and "shop/Model" in out
    assert shoal_logs("proxy") == (0, "[proxy] proxy says\n")
    assert shoal_logs("controller") == (0, "[controller] controller says\n")
    code, out = shoal_logs("shop/Model", "--replica", "nope")
    assert code == 1 and "no replica of 'shop/Model'" in out


def test_cli_help_documents_the_new_options() -> None:
    from click.testing import CliRunner

    from shoal.cli.main import cli

    runner = CliRunner()
    status = runner.invoke(cli, ["status", "--help"]).output
    assert "--watch" in status and "--interval" in status and "--iterations" in status
    logs = runner.invoke(cli, ["logs", "--help"]).output
    for option in ("--follow", "--replica", "--tail", "--address", "APP/DEPLOYMENT"):
        assert option in logs
    assert "--no-dashboard" in runner.invoke(cli, ["start", "--help"]).output
