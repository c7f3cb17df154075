"""The deployment applier's retry of Ray Serve's pickle-registry race (`lmaas.serve.control`), without Ray running.

The race itself needs two threads inside `serve.run` at the wrong instant; it is injected here.
"""

from __future__ import annotations

import pytest

from lmaas.serve import control


def test_the_pickle_registry_race_is_retried_and_other_errors_are_not(monkeypatch):
    calls = []

    def flaky(change):  # noqa: ANN001, ANN202
        calls.append(change["id"])
        if len(calls) < 3:
            raise ValueError(f"<module 'ray.serve.autoscaling_policy'> {control.PICKLE_RACE}")
        return "deployed"

    monkeypatch.setattr(control, "_apply", flaky)
    monkeypatch.setattr(control.time, "sleep", lambda _s: None)
    assert control._apply_retrying({"id": "c1"}) == "deployed" and calls == ["c1"] * 3

    calls.clear()
    monkeypatch.setattr(control, "_apply", lambda change: calls.append(1) or (_ for _ in ()).throw(ValueError(control.PICKLE_RACE)))
    with pytest.raises(ValueError, match="pickle by value"):
        control._apply_retrying({"id": "c2"})
    assert len(calls) == control.PICKLE_RACE_ATTEMPTS

    calls.clear()
    monkeypatch.setattr(control, "_apply", lambda change: calls.append(1) or (_ for _ in ()).throw(ValueError("unknown deployment change 'x'")))
    with pytest.raises(ValueError, match="unknown deployment change"):
        control._apply_retrying({"id": "c3"})
    assert len(calls) == 1


def test_a_promotion_swaps_the_stable_and_canary_deployments():
    from lmaas.serve.deployments import ServedModel

    served = ServedModel(ref="tiny:1", name="m", canary={"ref": "tiny:2"})
    assert served.deployments == ("model-m", "model-m-canary")
    promoted = served.model_copy(update={"ref": "tiny:2", "canary": None, "swapped": True})
    assert promoted.deployments == ("model-m-canary", "model-m")  # the canary's replicas go on serving as the stable side
    assert ServedModel.model_validate(promoted.model_dump(mode="json")).deployments == promoted.deployments
