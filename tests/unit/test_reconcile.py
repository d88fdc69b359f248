from __future__ import annotations

from shoal.runtime.reconcile import ReplicaView, StartReplica, StopReplica, reconcile
from shoal.status import ReplicaState

R, S, X = ReplicaState.RUNNING, ReplicaState.STARTING, ReplicaState.STOPPING


def v(replica_id: str, version: str, state: ReplicaState) -> ReplicaView:
    return ReplicaView(replica_id, version, state)


def test_starts_missing_replicas() -> None:
    assert reconcile(3, "v1", [v("a", "v1", R)]) == [StartReplica("v1"), StartReplica("v1")]


def test_steady_state_does_nothing() -> None:
    assert reconcile(2, "v1", [v("a", "v1", R), v("b", "v1", S)]) == []


def test_scale_down_prefers_starting_replicas() -> None:
    actions = reconcile(1, "v1", [v("a", "v1", R), v("b", "v1", S), v("c", "v1", R)])
    assert actions == [StopReplica("b", "scaling down"), StopReplica("a", "scaling down")]


def test_stopping_replicas_are_not_counted() -> None:
    assert reconcile(1, "v1", [v("a", "v1", X)]) == [StartReplica("v1")]


def test_rolling_update_keeps_old_until_new_is_running() -> None:
    old = [v("a", "v1", R), v("b", "v1", R)]
    # Nothing new yet: start two new, keep both old serving.
    assert reconcile(2, "v2", old) == [StartReplica("v2"), StartReplica("v2")]
    # One new replica running: retire exactly one old one.
    state = [*old, v("n1", "v2", R), v("n2", "v2", S)]
    assert reconcile(2, "v2", state) == [StopReplica("a", "replaced by a new version")]
    # Both new running: retire the rest.
    state = [v("b", "v1", R), v("n1", "v2", R), v("n2", "v2", R)]
    assert reconcile(2, "v2", state) == [StopReplica("b", "replaced by a new version")]


def test_old_starting_replicas_stop_at_once() -> None:
    assert reconcile(1, "v2", [v("a", "v1", S), v("n", "v2", R)]) == [StopReplica("a", "replaced by a new version")]


def test_failed_new_version_keeps_old_serving() -> None:
    state = [v("a", "v1", R)]
    assert reconcile(1, "v2", state, can_start=False) == []


def test_delete_stops_everything() -> None:
    state = [v("a", "v1", R), v("b", "v2", S), v("c", "v2", R)]
    actions = reconcile(0, "v2", state)
    assert {a.replica_id for a in actions if isinstance(a, StopReplica)} == {"a", "b", "c"}
