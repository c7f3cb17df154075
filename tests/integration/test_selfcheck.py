"""Ray workers reach the artifact store and the database they are given (all four combinations)."""

from __future__ import annotations

import sqlalchemy as sa

from lmaas import cluster, db
from lmaas.config import Settings
from lmaas.db.schema import events
from lmaas.ops import health
from lmaas.storage import Storage


def test_self_check_on_ray_workers(ray_cluster, storage_uri, database_url, tmp_path):
    uri, endpoint = storage_uri
    settings = Settings(home=tmp_path, storage=uri, database_url=database_url, s3_endpoint_url=endpoint)
    report = health.self_check(settings, tasks=3)

    assert sorted(w.index for w in report.workers) == [0, 1, 2]
    assert len({w.pid for w in report.workers}) >= 1
    storage = Storage.from_settings(settings)
    for worker in report.workers:
        assert storage.sha256(worker.object_path) == worker.sha256
    assert storage.list_published("selfcheck") == [report.prefix]
    assert storage.verify(report.prefix).sha256 == report.manifest_sha256
    assert report.events_recorded == 3
    with db.connect(database_url).connect() as conn:
        actions = conn.execute(sa.select(events.c.action, events.c.actor)).all()
    assert sorted(a for a, _ in actions) == ["selfcheck", "selfcheck.worker", "selfcheck.worker", "selfcheck.worker"]
    assert all(actor.startswith("worker:") for action, actor in actions if action == "selfcheck.worker")


def test_connect_reuses_the_running_cluster(ray_cluster, lmaas_env):
    from lmaas.config import load_settings

    info = cluster.connect(load_settings())
    assert not info.started_here
    assert info.cpus == 2
    assert info.nodes == 1
    assert info.address == ray_cluster.address_info["gcs_address"]


def test_health_checks_name_what_failed(lmaas_env, s3_server, monkeypatch):
    from lmaas.config import load_settings

    monkeypatch.setenv("LMAAS_STORAGE", "s3://missing-bucket/x")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    check = health.check_storage(load_settings())
    assert not check.ok and "missing-bucket" in check.detail
    monkeypatch.setenv("LMAAS_STORAGE", s3_server.uri("fine"))
    assert health.check_storage(load_settings()).ok
