"""`lmaas deploy` / `lmaas deployments` / `lmaas undeploy` as a user runs them, against a running Ray cluster."""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import free_port  # noqa: E402
from serve_helpers import make_causal_lm  # noqa: E402

pytestmark = pytest.mark.timeout(300)


def assert_one_line_error(result, *words: str) -> None:
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def complete(port: int, model: str, key: str) -> dict:
    body = json.dumps({"model": model, "prompt": "def f(x):", "max_tokens": 3, "ignore_eos": True}).encode()
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body, headers=headers)
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def list_models_grpc(port: int, key: str) -> list:
    import grpc

    from lmaas.serve.protocol import lmaas_pb2 as pb
    from lmaas.serve.protocol import lmaas_pb2_grpc as pb_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        metadata = (("authorization", f"Bearer {key}"),)
        return list(pb_grpc.InferenceStub(channel).ListModels(pb.ListModelsRequest(), metadata=metadata, timeout=60).models)


def test_deploy_list_undeploy(ray_cluster, lmaas_env, cli, tmp_path):
    from ray import serve

    from lmaas.config import load_settings
    from lmaas.registry import ModelRegistry

    ModelRegistry.from_settings(load_settings()).register_version("tiny", make_causal_lm(tmp_path / "lm"), task="causal-lm")
    assert_one_line_error(cli("deploy", "tiny", env=lmaas_env), "RAY_ADDRESS")
    env = {**lmaas_env, "RAY_ADDRESS": ray_cluster.address_info["gcs_address"]}
    assert_one_line_error(cli("deploy", "nope", env=env), "nope")
    port, grpc_port = free_port(), free_port()
    try:
        deployed = cli(
            "deploy", "tiny", "--name", "tiny-lm", "--min-replicas", "0", "--max-replicas", "2", "--num-cpus", "0.2",
            "--port", str(port), "--grpc-port", str(grpc_port), env=env,
        )
        assert deployed.returncode == 0, deployed.stderr
        assert "serving tiny:1" in deployed.stdout and f":{port}/v1/completions" in deployed.stdout
        assert "admin API key (shown once" in deployed.stdout  # the gateway requires keys: the first deploy makes one
        assert f":{grpc_port} lmaas.v1.Inference/Complete" in deployed.stdout
        created = cli("keys", "create", "--scope", "inference", "--json", env=env)
        assert created.returncode == 0, created.stderr
        key = json.loads(created.stdout)["secret"]
        assert complete(port, "tiny-lm", key)["usage"]["completion_tokens"] == 3
        assert "tiny-lm" in {m.id for m in list_models_grpc(grpc_port, key)}

        listed = cli("deployments", env=env)
        assert listed.returncode == 0, listed.stderr
        row = next(line for line in listed.stdout.splitlines() if "tiny-lm" in line)
        assert "tiny:1" in row and "HEALTHY" in row and "0..2" in row

        assert_one_line_error(cli("undeploy", "other", env=env), "other", "tiny-lm")
        undeployed = cli("undeploy", "tiny-lm", env=env)
        assert undeployed.returncode == 0, undeployed.stderr
        assert "nothing deployed" in cli("deployments", env=env).stdout
    finally:
        serve.shutdown()
