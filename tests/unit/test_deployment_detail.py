"""The dashboard's detail view of a deployment: parsing replicas' log files (pure), bounded
reads, the loopback rule and the query of /-/deployment.json."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from shoal.observability import deployment_detail as dd
from shoal.observability.dashboard import detail_query, is_loopback, respond
from shoal.observability.logformat import Identity, JSONFormatter, TextFormatter

WHO = Identity("replica", "Api-aaaa", "shop", "Api")


def record(msg: str, level: int = logging.INFO, created: float = 1.8e9, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            def scoring_step() -> None:
                raise KeyError("weights")
            scoring_step()
        except KeyError:
            exc_info = sys.exc_info()
    r = logging.LogRecord("user.model", level, __file__, 1, msg, None, exc_info)
    r.created = created
    r.request_id = "rid-1"
    return r


def test_text_error_record_unfolds_its_traceback_and_the_tail_keeps_prints() -> None:
    fmt = TextFormatter(WHO)
    text = "\n".join([
        fmt.format(record("starting", created=100.0)),
        "hello from print()",
        fmt.format(record("request rid-1 to __call__ failed:", logging.ERROR, created=101.0, exc=True)),
        "",
    ])
    errors, tail = dd.scan([dd.LogText("Api-aaaa", text, pid=4242)])
    assert len(errors) == 1
    e = errors[0]
    assert e["level"] == "ERROR" and e["replica"] == "Api-aaaa" and e["pid"] == os.getpid()  # the line's own pid
    assert e["message"] == "request rid-1 to __call__ failed:" and e["logger"] == "user.model"
    assert e["traceback"].startswith("Traceback (most recent call last):\n") and "in scoring_step" in e["traceback"]
    assert e["traceback"].rstrip().endswith("KeyError: 'weights'")
    assert [x["line"] for x in tail][1] == "hello from print()"
    assert tail[1]["pid"] == 4242 and tail[1]["time"] == tail[0]["time"]  # a print takes the record's time
    assert len(tail) == 3 and "\\n" in tail[2]["line"]  # the tail shows the file's lines as they are


def test_json_records_and_raw_stderr_tracebacks_with_chains() -> None:
    fmt = JSONFormatter(WHO)
    raw = [
        fmt.format(record("loaded", created=200.0)),
        fmt.format(record("lost the cache", logging.CRITICAL, created=201.0, exc=True)),
        "Exception in thread worker:",
        "Traceback (most recent call last):",
        '  File "model.py", line 3, in run',
        "    fetch()",
        "ValueError: first",
        "",
        "During handling of the above exception, another exception occurred:",
        "",
        "Traceback (most recent call last):",
        '  File "model.py", line 5, in run',
        "RuntimeError: second",
        "after the traceback",
    ]
    errors, tail = dd.scan([dd.LogText("Api-bbbb", "\n".join(raw), pid=7)])
    assert [e["level"] for e in errors] == ["STDERR", "CRITICAL"]  # newest first (the stderr one inherits 201)
    stderr, critical = errors
    assert stderr["message"] == "RuntimeError: second" and "ValueError: first" in stderr["traceback"]
    assert "after the traceback" not in stderr["traceback"] and stderr["pid"] == 7
    assert critical["message"] == "lost the cache" and "KeyError: 'weights'" in critical["traceback"]
    assert json.loads(tail[0]["line"])["message"] == "loaded" and tail[-1]["line"] == "after the traceback"


def test_files_merge_by_time_and_every_limit_holds() -> None:
    fmt = TextFormatter(WHO)
    a = "\n".join(fmt.format(record(f"a{i}", created=float(2 * i))) for i in range(50))
    b = "\n".join(fmt.format(record(f"b{i}", logging.ERROR, created=float(2 * i + 1))) for i in range(50))
    errors, tail = dd.scan([dd.LogText("A", a), dd.LogText("B", b)], max_lines=10, max_errors=3)
    assert [x["line"].rsplit(": ", 1)[1] for x in tail] == ["b44", "a45", "b45", "a46", "b46", "a47", "b47", "a48",
                                                              "b48", "a49", "b49"][-10:]
    assert [e["message"] for e in errors] == ["b49", "b48", "b47"]
    long_line = "x" * (dd.MAX_LINE * 3)
    errors, tail = dd.scan([dd.LogText("C", long_line)])
    assert len(tail[0]["line"]) == dd.MAX_LINE and tail[0]["line"].endswith("…")


def test_partial_first_line_is_dropped_and_controls_are_escaped() -> None:
    text = "cut-in-the-middle line\nsecond \x1b[2Jline \u202e\n"
    _, tail = dd.scan([dd.LogText("D", text, complete=False)])
    assert [x["line"] for x in tail] == ["second \\x1b[2Jline \\u202e"]
    errors, _ = dd.scan([dd.LogText("D", "2026-01-01 00:00:00,000 ERROR replica a/b/c pid=9 x: bad \x1b]0;t\x07")])
    assert errors[0]["message"] == "bad \\x1b]0;t\\x07" and errors[0]["pid"] == 9


def test_read_tail_reads_only_the_end(tmp_path: Path) -> None:
    path = tmp_path / "r.log"
    path.write_bytes(b"".join(b"line %06d\n" % i for i in range(20000)))
    text, complete, _ = dd.read_tail(str(path), 1000)
    assert len(text.encode()) == 1000 and not complete and text.endswith("line 019999\n")
    small = tmp_path / "s.log"
    small.write_text("only\n")
    assert dd.read_tail(str(small))[:2] == ("only\n", True)
    fifo = tmp_path / "f.log"
    os.mkfifo(fifo)
    with pytest.raises(OSError):
        dd.read_tail(str(fifo))  # never blocks on a FIFO


def test_deployment_files_running_first_bounded_and_no_linked_folders(tmp_path: Path) -> None:
    d = tmp_path / "shop" / "Api"
    d.mkdir(parents=True)
    for i in range(5):
        (d / f"Api-{i}.log").write_text(f"{i}\n")
        os.utime(d / f"Api-{i}.log", (1000 + i, 1000 + i))
    (d / "Api-4.log.1").write_text("rotated\n")
    names = [r for r, _, _ in dd.deployment_files(str(tmp_path), "shop", "Api", live=["Api-0"], limit=3)]
    assert names == ["Api-0", "Api-4", "Api-3"]
    out = dd.collect(str(tmp_path), "shop", "Api", {"Api-0": 11})
    assert out["files"][0] == "Api-0" and {x["line"] for x in out["logs"]} == {"0", "1", "2", "3", "4"}
    assert [x["pid"] for x in out["logs"] if x["replica"] == "Api-0"] == [11]
    (tmp_path / "other").mkdir()
    os.symlink(d, tmp_path / "other" / "Api")
    assert dd.deployment_files(str(tmp_path), "other", "Api") == []
    assert dd.deployment_files(str(tmp_path), "shop", "Missing") == []


@pytest.mark.parametrize(("client", "ok"), [
    (("127.0.0.1", 5), True), (("127.8.9.10", 5), True), (("::1", 5), True), (("::ffff:127.0.0.1", 5), True),
    (("10.0.0.5", 5), False), (("192.168.1.2", 5), False), (("::ffff:10.0.0.1", 5), False), (("2001:db8::1", 5), False),
    (("localhost", 5), False), (None, False), ((), False), (("", 0), False),
])
def test_only_loopback_peers_are_loopback(client: Any, ok: bool) -> None:
    assert is_loopback(client) is ok


def test_detail_query_names_what_is_wrong() -> None:
    assert detail_query(b"app=shop&deployment=Api%2Fv2") == ("shop", "Api/v2")
    assert "'app'" in str(detail_query(b"deployment=Api")) and "required" in str(detail_query(b"deployment=Api"))
    assert "'deployment'" in str(detail_query(b"app=shop&deployment="))
    assert "repeated" in str(detail_query(b"app=a&app=b&deployment=c"))
    assert "longer" in str(detail_query(b"app=" + b"a" * 2000 + b"&deployment=c"))
    assert "malformed" in str(detail_query(b"app=%ff&deployment=c"))


class _Client:
    def __init__(self, answer: dict[str, Any]) -> None:
        self.answer = answer
        self.calls: list[tuple[str, dict[str, Any]]] = []

    async def call(self, op: str, timeout: float | None = None, **args: Any) -> Any:
        self.calls.append((op, args))
        return self.answer


class _Front:
    def __init__(self, answer: dict[str, Any], dashboard: bool = True) -> None:
        self.client = _Client(answer)
        self.options = type("O", (), {"dashboard": dashboard})()


def _get(front: _Front, client: Any, query: bytes) -> tuple[int, dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def send(msg: dict[str, Any]) -> None:
        sent.append(msg)

    scope = {"method": "GET", "client": client, "query_string": query}
    asyncio.run(respond(front, "/-/deployment.json", scope, send, "rid"))
    return sent[0]["status"], json.loads(sent[1]["body"])


def test_endpoint_refuses_other_peers_before_asking_the_controller() -> None:
    front = _Front({"app": "shop", "deployment": "Api", "logs": []})
    status, body = _get(front, ("10.1.2.3", 4000), b"app=shop&deployment=Api")
    assert status == 403 and "loopback" in body["error"] and front.client.calls == []
    status, body = _get(front, ("127.0.0.1", 4000), b"app=shop")
    assert status == 400 and "'deployment'" in body["error"] and front.client.calls == []
    status, body = _get(front, ("127.0.0.1", 4000), b"app=shop&deployment=Api")
    assert status == 200 and body["deployment"] == "Api"
    assert front.client.calls == [("deployment_detail", {"app": "shop", "deployment": "Api"})]
    missing = _Front({"missing": "deployment", "error": "no deployment 'Nope' in application 'shop'"})
    status, body = _get(missing, ("::1", 4000), b"app=shop&deployment=Nope")
    assert status == 404 and "'Nope'" in body["error"] and body["deployment"] == "Nope"
    off = _Front({}, dashboard=False)
    assert _get(off, ("127.0.0.1", 1), b"app=a&deployment=b")[0] == 404 and off.client.calls == []
