"""The private corners of Ray that rayline uses (rayline.raycompat) are in the installed
Ray, in the shape rayline expects: an upgrade that moves one fails here, naming it."""

import logging

import pytest

from rayline import raycompat


def test_every_private_ray_name_rayline_uses_is_there():
    assert raycompat.problems() == []


def test_a_missing_name_is_reported_by_name(monkeypatch):
    from ray.util import debug

    monkeypatch.delattr(debug, "_logged")
    (problem,) = raycompat.problems()
    assert problem.startswith("ray.util.debug._logged: AttributeError")


def test_forgetting_log_once_keys_forgets_only_those_with_the_prefix():
    from ray.util import debug

    assert debug.log_once("rayline-test:a") and debug.log_once("other-test:b")
    raycompat.forget_log_once_keys("rayline-test:")
    assert debug.log_once("rayline-test:a")  # forgotten: logs once again
    assert not debug.log_once("other-test:b")


@pytest.mark.parametrize("name", raycompat.PRIVATE_LOGGERS)
def test_the_private_loggers_are_ray_modules_that_log_under_their_name(name):
    module = __import__(name, fromlist=["_"])
    assert module.__name__ == name
    assert logging.getLogger(name) is logging.getLogger(module.__name__)
