"""The fault suite's load generator tells ok, failed and hung requests apart."""

from __future__ import annotations

from conftest import Instance
from loadgen import FAILED, HUNG, OK, Load, running

from shoal import serve


@serve.deployment(max_ongoing_requests=100)
class Sometimes:
    async def __call__(self, request: object) -> object:
        import asyncio

        from starlette.responses import PlainTextResponse

        q = request.query_params  # type: ignore[attr-defined]
        if "sleep" in q:
            await asyncio.sleep(float(q["sleep"]))
        return PlainTextResponse("x", status_code=int(q.get("status", 200)))


def test_counts_ok_failed_and_hung(instance: Instance) -> None:
    serve.run(Sometimes.bind())
    with running(Load(instance.url + "/", clients=2)) as load:
        load.mark()
        assert load.wait_ok(10)
        assert load.wait_recovered(streak=5, timeout=20) == 0.0  # nothing went wrong
        counts = load.stop()
    assert counts.ok >= 10 and counts.failed == 0 and counts.hung == 0, counts

    failing = Load(instance.url + "/?status=503", clients=1)
    with running(failing):
        assert failing.wait_recovered(streak=1, timeout=2) is None
        counts = failing.stop()
    assert counts.failed >= 1 and counts.ok == 0 and counts.details.get("503") == counts.failed, counts

    slow = Load(instance.url + "/?sleep=30", clients=1, hung_after_s=0.5)
    with running(slow):
        assert not slow.wait_ok(1, timeout=1.5)
        counts = slow.stop()
    assert counts.hung >= 1 and counts.ok == 0, counts
    assert {o.kind for o in slow.outcomes} == {HUNG} and OK != FAILED
