"""The deployment applier's retry of Ray Serve's pickle-registry race (`lmaas.serve.deployments`), without Ray running.

The race itself needs two threads inside `serve.run` at the wrong instant; it is injected here.
"""

from __future__ import annotations

import pytest

from lmaas.serve import deployments


def test_the_pickle_registry_race_is_retried_and_other_errors_are_not(monkeypatch):
    calls = []

    def flaky(change):  # noqa: ANN001, ANN202
        calls.append(change["id"])
        if len(calls) < 3:
            raise ValueError(f"<module 'ray.serve.autoscaling_policy'> {deployments.PICKLE_RACE}")
        return "deployed"

    monkeypatch.setattr(deployments, "_apply", flaky)
    monkeypatch.setattr(deployments.time, "sleep", lambda _s: None)
    assert deployments._apply_retrying({"id": "c1"}) == "deployed" and calls == ["c1"] * 3

    calls.clear()
    monkeypatch.setattr(deployments, "_apply", lambda change: calls.append(1) or (_ for _ in ()).throw(ValueError(deployments.PICKLE_RACE)))
    with pytest.raises(ValueError, match="pickle by value"):
        deployments._apply_retrying({"id": "c2"})
    assert len(calls) == deployments.PICKLE_RACE_ATTEMPTS

    calls.clear()
    monkeypatch.setattr(deployments, "_apply", lambda change: calls.append(1) or (_ for _ in ()).throw(ValueError("unknown deployment change 'x'")))
    with pytest.raises(ValueError, match="unknown deployment change"):
        deployments._apply_retrying({"id": "c3"})
    assert len(calls) == 1


def test_a_promotion_swaps_the_stable_and_canary_deployments():
    from lmaas.serve.options import ServedModel

    served = ServedModel(ref="tiny:1", name="m", canary={"ref": "tiny:2"})
    assert served.deployments == ("model-m", "model-m-canary")
    promoted = served.model_copy(update={"ref": "tiny:2", "canary": None, "swapped": True})
    assert promoted.deployments == ("model-m-canary", "model-m")  # the canary's replicas go on serving as the stable side
    assert ServedModel.model_validate(promoted.model_dump(mode="json")).deployments == promoted.deployments


def test_records_follow_what_a_gateway_serves_and_keep_their_owners(tmp_path):
    """`reconcile` (a gateway replica starting): new names get their model's owner, gone names lose their record,
    a changed reference is updated and the owner `lmaas deploy` recorded stays."""
    from lmaas import db
    from lmaas.db.schema import registered_models
    from lmaas.serve.records import DeploymentRecords

    engine = db.connect(f"sqlite:///{tmp_path / 'lmaas.db'}")
    with engine.begin() as conn:
        conn.execute(registered_models.insert().values(name="bob-lm", tenant="bob", description="", tags={}, created_at=0, last_version=1))
    records = DeploymentRecords(engine)
    records.record("app", "chat", tenant="alice", ref="a-lm:1", canary_ref=None)
    records.record("app", "old", tenant="alice", ref="a-lm:1", canary_ref=None)
    records.reconcile("app", [("chat", "a-lm:2", "a-lm:3"), ("bobs", "bob-lm:1", None), ("orphan", "nowhere:1", None)])
    got = {n: (r.tenant, r.ref, r.canary_ref) for n, r in records.list("app").items()}
    assert got == {"chat": ("alice", "a-lm:2", "a-lm:3"), "bobs": ("bob", "bob-lm:1", None), "orphan": ("default", "nowhere:1", None)}
    records.reconcile("other-app", [])
    assert set(records.list("app")) == {"chat", "bobs", "orphan"}  # another app's records are its own


def test_tenant_caps_come_from_the_apps_args_per_tenant(tmp_path):
    from lmaas import db
    from lmaas.errors import PermissionDeniedError
    from lmaas.serve.options import ServeAppArgs, ServedModel
    from lmaas.serve.records import DeploymentRecords

    args = ServeAppArgs.model_validate({"models": [{"ref": "m:1"}], "tenant_caps": {"default": {"max_deployments": 1},
                                                                                    "tenants": {"acme": {"max_replicas": 16}}}})
    caps = args.tenant_caps
    assert caps.for_tenant("acme").max_replicas == 16 and caps.for_tenant("other").max_replicas == 4
    caps.for_tenant("acme").check(ServedModel(ref="m:1", max_replicas=16))
    with pytest.raises(PermissionDeniedError, match="max_replicas 16 is over"):
        caps.for_tenant("other").check(ServedModel(ref="m:1", max_replicas=16))
    with pytest.raises(PermissionDeniedError, match="only an admin colocates") as err:  # its engine would run in the shared gateway
        caps.for_tenant("acme").check(ServedModel(ref="m:1", colocated=True))
    assert err.value.param == "colocated"
    with pytest.raises(PermissionDeniedError, match="straight to vLLM") as err:  # a tokenizer path, a worker class to import
        caps.for_tenant("acme").check(ServedModel(ref="m:1", engine={"engine": "vllm", "engine_kwargs": {"worker_extension_cls": "os.system"}}))
    assert err.value.param == "engine.engine_kwargs"
    caps.for_tenant("acme").check(ServedModel(ref="m:1", engine={"engine": "vllm", "enforce_eager": True}))  # lmaas's own options are fine
    records = DeploymentRecords(db.connect(f"sqlite:///{tmp_path / 'lmaas.db'}"))
    records.record("app", "one", tenant="other", ref="m:1", canary_ref=None)
    records.check_count("app", "one", "other", caps.for_tenant("other"))  # replacing its own: not a new one
    with pytest.raises(PermissionDeniedError, match="holds 1 deployments"):
        records.check_count("app", "two", "other", caps.for_tenant("other"))
