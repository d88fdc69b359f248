from __future__ import annotations

import pickle

import cloudpickle
import pytest

from shoal.exceptions import (
    ActorDiedError,
    BackPressureError,
    DeploymentUnavailableError,
    RayServeException,
    RayTaskError,
    ReplicaDiedError,
    RequestCancelledError,
    wrap_remote_exception,
)


@pytest.mark.parametrize(
    "exc",
    [
        RayServeException("x"),
        BackPressureError(3, 2),
        DeploymentUnavailableError("gone"),
        RequestCancelledError("rid-1"),
        ReplicaDiedError("dead"),
    ],
)
def test_errors_pickle_round_trip(exc: Exception) -> None:
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is type(exc)
    assert str(back) == str(exc)


def test_back_pressure_message() -> None:
    e = BackPressureError(num_queued_requests=4, max_queued_requests=4)
    assert "max_queued_requests=4" in str(e)
    assert e.num_queued_requests == 4


def test_actor_died_alias() -> None:
    assert ActorDiedError is ReplicaDiedError


class CustomError(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(f"code {code}")
        self.code = code


def test_wrapped_user_error_is_both_types_and_pickles() -> None:
    original = CustomError(7)
    wrapped = wrap_remote_exception(original, "Traceback: line 1 in predict")
    assert isinstance(wrapped, CustomError)
    assert isinstance(wrapped, RayTaskError)
    assert wrapped.code == 7
    assert "code 7" in str(wrapped) and "line 1 in predict" in str(wrapped)
    back = cloudpickle.loads(cloudpickle.dumps(wrapped))
    assert isinstance(back, CustomError) and isinstance(back, RayTaskError)
    assert back.code == 7 and "line 1 in predict" in str(back)


def test_builtin_errors_are_caught_by_their_type() -> None:
    for exc in (ValueError("v"), KeyError("k"), ZeroDivisionError("z")):
        wrapped = wrap_remote_exception(exc, "tb")
        with pytest.raises(type(exc)):
            raise wrapped


def test_shoal_errors_pass_through_unwrapped() -> None:
    e = BackPressureError(1, 1)
    assert wrap_remote_exception(e, "tb") is e
