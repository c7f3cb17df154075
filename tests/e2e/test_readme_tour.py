"""The README's tour, run as written: every ```bash tour``` block, in order, in one fresh bash shell.

The blocks come from README.md itself (not a copy), so the documentation cannot drift from the
product. The tour's untagged ```bash blocks only start and stop a cluster; this test starts its
own (`ray start --head` in a private process group, whose GCS address it exports as RAY_ADDRESS),
because `ray stop` would stop every Ray cluster on the machine, the test session's included.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import BIN, REPO, ray_head_process  # noqa: E402

pytestmark = pytest.mark.timeout(900)

FENCE = re.compile(r"^```(?P<info>[^\n]*)\n(?P<body>.*?)^```$", re.S | re.M)


def tour_section() -> str:
    readme = (REPO / "README.md").read_text()
    start = readme.index("## Tour:")
    return readme[start : readme.index("\n## ", start + 1)]


def blocks(section: str) -> list[tuple[str, str]]:
    return [(m["info"].strip(), m["body"]) for m in FENCE.finditer(section)]


def test_the_tour_only_skips_starting_and_stopping_a_cluster():
    found = blocks(tour_section())
    assert sum(info == "bash tour" for info, _ in found) >= 5
    for info, body in found:
        if info == "bash tour":
            continue
        commands = [line.split("#")[0].strip() for line in body.splitlines() if line.split("#")[0].strip()]
        assert all(c.startswith(("ray start", "ray stop", "export RAY_ADDRESS", "source .venv")) for c in commands), body


def test_readme_tour_runs_as_written(lmaas_env, cli, tmp_path):
    """The tour as written; its `lmaas train` is also the suite's end-to-end test of the train CLI.

    It runs with signing keys and `LMAAS_REQUIRE_SIGNATURE=1`: `lmaas train` and `lmaas compress`
    sign what they register, `lmaas deploy` and the replicas check it, and a version whose
    signature is removed is refused at deploy.
    """
    from lmaas.registry.store import generate_signing_key

    private, public = generate_signing_key()
    signing = {"LMAAS_SIGNING_KEY": private, "LMAAS_VERIFY_KEY": public, "LMAAS_REQUIRE_SIGNATURE": "1"}
    script = "set -euo pipefail\n" + "\n".join(body for info, body in blocks(tour_section()) if info == "bash tour")
    with ray_head_process(num_cpus=2) as (_dashboard, head_env):
        env = {
            **lmaas_env,
            **signing,
            "RAY_ADDRESS": head_env["RAY_ADDRESS"],
            "RAY_AUTH_MODE": "token",
            "PATH": f"{BIN}:{lmaas_env['PATH']}",  # as after `source .venv/bin/activate`
            "COLUMNS": "200",
        }
        result = subprocess.run(["bash", "-c", script], env=env, cwd=REPO, capture_output=True, text=True, timeout=840)
    out = result.stdout
    assert result.returncode == 0, out[-4000:] + result.stderr[-4000:]
    assert "Traceback" not in result.stderr

    # what each step printed is true: the dataset, the run, the variant and its lineage, the calls
    assert "tour:1" in out
    assert "tour-lm:1" in out and "tour-lm-int8-dynamic:1" in out
    # `lmaas train`: live progress on stderr (one line per report), the run and its registered model on stdout
    assert "step     40  loss" in result.stderr
    trained = next(line for line in out.splitlines() if line.startswith("run ") and " 40 steps, loss " in line)
    run_id = trained.split()[1].rstrip(":")
    assert "  registered tour-lm:1 (alias production)" in out
    completion = json.loads(next(line for line in out.splitlines() if line.startswith('{"id":"cmpl')))
    assert completion["model"] == "tour-lm" and completion["usage"]["completion_tokens"] >= 1
    models = next(line for line in out.splitlines() if line.startswith("['"))
    assert "tour-lm" in models and "tour-lm-int8" in models
    assert "streamed: " in out
    assert re.search(r"completion \(\d+ tokens\): ['\"]", out) and "chat, streamed: " in out  # examples/openai_client.py
    assert "undeployed tour-lm" in out

    from lmaas.config import load_settings
    from lmaas.registry import ModelRegistry

    registry = ModelRegistry.from_settings(load_settings())
    variant = registry.resolve("tour-lm-int8-dynamic@production")
    assert variant.parent == "tour-lm:1" and registry.resolve("tour-lm@production").dataset == "tour:1"
    runs = json.loads(cli("runs", "--json", env=lmaas_env).stdout)
    assert [(r["run_id"], r["status"], r["model"]) for r in runs] == [(run_id, "finished", "tour-lm:1")]
    assert json.loads(cli("runs", run_id, env=lmaas_env).stdout)["metrics"]["step"] == 40
    shown = cli("models", "show", "tour-lm@production", env=lmaas_env)
    assert shown.returncode == 0 and run_id in shown.stdout

    verifying = ModelRegistry.from_settings(load_settings(), verify_key=bytes.fromhex(public), require_signature=True)
    assert verifying.verify("tour-lm:1").signature and verifying.verify(variant.ref).signature

    from lmaas.db.schema import model_versions

    prefix = verifying.resolve("tour-lm:1").prefix  # (outside the transaction: on SQLite it holds the write lock)
    with verifying.engine.begin() as conn:  # someone strips the signature in the database
        conn.execute(model_versions.update().where(model_versions.c.prefix == prefix).values(signature=None))
    refused = cli("deploy", "tour-lm:1", env={**lmaas_env, **signing})
    assert refused.returncode == 1 and refused.stderr.strip().splitlines() == ["error: tour-lm:1 is not signed and this deployment requires signed versions"], refused.stderr
