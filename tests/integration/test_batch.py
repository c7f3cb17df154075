"""`lmaas batch` (`lmaas.batch.run_batch`) on the shared Ray cluster: real registry, real actors, real S3-compatible server.

One registry for the module: a tiny random-weight Llama and the MiniLM embedding model, both owned by tenant `acme`.
What a batch answers is compared with what the online API (`build_openai_app` over uvicorn, real HTTP) answers the
same requests: equal bodies for greedy and seeded requests, ids and timestamps aside.
"""

from __future__ import annotations

import collections
import io
import json
import shutil
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import uvicorn_app
from lmaas.batch import BatchConfig, run_batch
from lmaas.errors import (
    AlreadyExistsError,
    InvalidInputError,
    NotFoundError,
    PermissionDeniedError,
)
from serve_helpers import EMBEDDING_DIR, make_causal_lm

pytestmark = pytest.mark.timeout(300)
TENANT = "acme"
SMALL = {"concurrency": 2, "num_cpus": 0.5, "lines_per_block": 16}
"""Two actors on the 2-CPU cluster, one torch thread each; 100 lines make 7 blocks."""


@pytest.fixture(scope="module")
def world(ray_cluster, tmp_path_factory):
    """The registry, its store and database, and the model directories."""
    from lmaas import db
    from lmaas.registry import ModelRegistry
    from lmaas.storage import Storage
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    root = tmp_path_factory.mktemp("batch")
    database_url = f"sqlite:///{root / 'lmaas.db'}"
    registry = ModelRegistry(Storage(f"file://{root / 'store'}"), db.connect(database_url))
    lm = make_causal_lm(root / "lm", max_seq_len=128, initializer_range=0.5)  # large weights: greedy text varies token by token
    registry.register_version("tiny", lm, task="causal-lm", tenant=TENANT)
    emb = root / "minilm"
    shutil.copytree(EMBEDDING_DIR, emb, ignore=shutil.ignore_patterns("*.md"))
    registry.register_version("minilm", emb, task="embedding", tenant=TENANT)
    area = root / "store" / "uploads" / TENANT  # where a tenant's batch may read and write (`data.sources.check_tenant_source`)
    area.mkdir(parents=True)
    return {"root": root, "area": area, "registry": registry, "lm": lm, "emb": emb, "database_url": database_url}


@pytest.fixture(scope="module")
def online(world):
    """The online API over the same model files (what a batch line must equal), as a base URL."""
    from lmaas.serve.engine import CausalLMEngine, EmbeddingEngine
    from lmaas.serve.openai_app import build_openai_app

    engines = {"tiny": CausalLMEngine(world["lm"], model_id="tiny", max_batch_size=16, num_threads=1),
               "minilm": EmbeddingEngine(world["emb"], model_id="minilm", num_threads=1)}
    with uvicorn_app(build_openai_app(engines)) as url:
        yield url


def line(custom_id: str, url: str, body: dict) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def mixed_lines(count: int = 100) -> list[dict]:
    """Completions and chat, alternating; greedy except every 7th (seeded sampling); some with n=2 or two prompts."""
    lines = []
    for i in range(count):
        sampling = {"temperature": 0.8, "seed": i} if i % 7 == 3 else {"temperature": 0}
        extra = {"n": 2} if i % 10 == 4 else {}
        if i % 2:
            prompt = [f"def g{i}(y):", "import os"] if i % 10 == 5 else f"def f{i}(x):"
            lines.append(line(f"req-{i}", "/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 4 + i % 5, **sampling, **extra}))
        else:
            messages = [{"role": "user", "content": f"print {i} numbers"}]
            lines.append(line(f"req-{i}", "/v1/chat/completions", {"messages": messages, "max_tokens": 4 + i % 5, **sampling, **extra}))
    return lines


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((item if isinstance(item, str) else json.dumps(item)) + "\n" for item in lines))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(text) for text in path.read_text().splitlines()]


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def without_ids(body: dict) -> dict:
    return {k: v for k, v in body.items() if k not in ("id", "created")}


def by_id(out: list[dict]) -> dict[str, dict]:
    counts = collections.Counter(o["custom_id"] for o in out)
    assert max(counts.values()) == 1, [k for k, v in counts.items() if v > 1]
    return {o["custom_id"]: o for o in out}


@pytest.fixture(scope="module")
def mixed_run(world):
    """One 100-line batch of completions and chat, run as the model's tenant: (input lines, result, output lines)."""
    lines = mixed_lines()
    source = write_jsonl(world["area"] / "mixed.jsonl", lines)
    result = run_batch(BatchConfig(input=str(source), model="tiny", output=str(world["area"] / "mixed-out.jsonl"), **SMALL),
                       registry=world["registry"], tenant=TENANT)
    return lines, result, read_jsonl(world["area"] / "mixed-out.jsonl")


def test_a_mixed_file_gets_one_line_per_request_equal_to_the_online_api(mixed_run, online):
    lines, result, out = mixed_run
    assert (result.total, result.completed, result.failed, result.model, result.actors) == (100, 100, 0, "tiny:1", 2)
    assert len(out) == 100
    answers = by_id(out)
    assert set(answers) == {f"req-{i}" for i in range(100)}
    for request in lines:
        got = answers[request["custom_id"]]
        assert set(got) == {"id", "custom_id", "response", "error"} and got["id"].startswith("batch_req_") and got["error"] is None
        response = got["response"]
        assert response["status_code"] == 200 and response["request_id"] == response["body"]["id"]
        status, expected = post(online + request["url"], {"model": "tiny", **request["body"]})
        assert status == 200
        assert without_ids(response["body"]) == without_ids(expected), request  # text, finish reasons, usage: all of it
    usage = [answers[r["custom_id"]]["response"]["body"]["usage"] for r in lines]
    assert result.output_tokens == sum(u["completion_tokens"] for u in usage) > 0
    assert result.prompt_tokens == sum(u["prompt_tokens"] for u in usage)
    texts = {answers[r["custom_id"]]["response"]["body"]["choices"][0].get("text") for r in lines if r["url"] == "/v1/completions"}
    assert len(texts) > 20  # the prompts differ, and so do the answers: equality above means something


def test_a_killed_actor_loses_and_repeats_no_line(world, mixed_run, monkeypatch):
    from lmaas.batch.worker import FAULT_ENV

    lines, _, first = mixed_run
    marker = world["root"] / "killed"
    monkeypatch.setenv(FAULT_ENV, f"40:{marker}")  # the first actor to have answered 40 lines (mid-block) SIGKILLs itself, once
    output = world["area"] / "killed-out.jsonl"
    result = run_batch(BatchConfig(input=str(world["area"] / "mixed.jsonl"), model="tiny", output=str(output), **SMALL),
                       registry=world["registry"], tenant=TENANT)
    assert marker.exists(), "no actor was killed"
    out = read_jsonl(output)
    assert (result.total, result.completed, len(out)) == (100, 100, 100)
    answers, before = by_id(out), by_id(first)
    assert set(answers) == set(before)
    for request in lines:  # greedy and seeded: the block run again answers as the first run did
        assert without_ids(answers[request["custom_id"]]["response"]["body"]) == without_ids(before[request["custom_id"]]["response"]["body"])


def test_a_cancelled_batch_publishes_the_lines_answered_so_far_and_errors_apart(world, mixed_run):
    import threading

    lines = mixed_run[0] + ["not json", line("bad", "/v1/completions", {"prompt": "x", "max_tokens": -1})]
    source = write_jsonl(world["area"] / "cancel.jsonl", lines * 3)  # 306 lines, 20 blocks
    output, errors = world["area"] / "cancel-out.jsonl", world["area"] / "cancel-errors.jsonl"
    cancel, seen = threading.Event(), []

    def progress(p) -> None:  # noqa: ANN001 - a BatchProgress
        seen.append(p.done)
        if p.stage == "running" and p.done >= 48:
            cancel.set()  # as Ctrl-C (the CLI) or SIGTERM (a queued batch) does

    result = run_batch(BatchConfig(input=str(source), model="tiny", output=str(output), error_output=str(errors), **SMALL),
                       registry=world["registry"], tenant=TENANT, progress=progress, cancel=cancel)
    assert result.cancelled and 48 <= result.done < 306 and result.done == max(seen), (result, seen)
    out, bad = read_jsonl(output), read_jsonl(errors)
    assert (len(out), len(bad)) == (result.completed, result.failed)  # what was counted is what was published, whole
    assert all(o["response"]["status_code"] == 200 for o in out) and all(o["response"] is None or o["response"]["status_code"] != 200 for o in bad)
    assert sum(result.blocks_per_node.values()) * 16 >= result.done and result.error_output == str(errors)
    with pytest.raises(InvalidInputError) as info:  # the two outputs must differ
        run_batch(BatchConfig(input=str(source), model="tiny", output=str(output), error_output=str(output), overwrite=True),
                  registry=world["registry"], tenant=TENANT)
    assert info.value.param == "error_output"


def test_bad_lines_become_error_lines_and_the_rest_go_on_from_s3_to_s3(world, s3_server):
    from lmaas.storage import Storage

    good = mixed_lines(6)
    bad = [
        "{not json",
        json.dumps(["a", "list"]),
        json.dumps({"method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}),  # no custom_id
        json.dumps(line("bad-url", "/v1/images/generations", {"prompt": "x"})),
        json.dumps({**line("bad-method", "/v1/completions", {"prompt": "x"}), "method": "GET"}),
        json.dumps(line("no-messages", "/v1/chat/completions", {"max_tokens": 3})),
        json.dumps(line("other-model", "/v1/completions", {"model": "minilm", "prompt": "x"})),
        json.dumps(line("streamed", "/v1/completions", {"prompt": "x", "stream": True})),
        json.dumps(line("too-long", "/v1/completions", {"prompt": "x " * 300, "max_tokens": 4})),  # past the 128-token context
        json.dumps(line("not-embeddings", "/v1/embeddings", {"input": "x"})),  # a causal LM computes none, as online
        "",
        "   ",
    ]
    store = Storage(s3_server.uri("batch"), endpoint_url=s3_server.endpoint)
    store.write_text("in/requests.jsonl", "".join(f"{t}\n" for t in [json.dumps(g) for g in good[:3]] + bad + [json.dumps(g) for g in good[3:]]))
    output = s3_server.uri("batch/out/answers.jsonl")
    result = run_batch(BatchConfig(input=s3_server.uri("batch/in/requests.jsonl"), model="tiny", output=output, **SMALL),
                       registry=world["registry"], endpoint_url=s3_server.endpoint)  # an admin: no tenant
    out = [json.loads(t) for t in store.read_text("out/answers.jsonl").splitlines()]
    assert (result.total, result.completed, result.failed, len(out)) == (16, 6, 10, 16)  # blank lines are no requests
    answers = {o["custom_id"]: o for o in out if o["custom_id"] is not None}
    assert all(answers[g["custom_id"]]["response"]["status_code"] == 200 for g in good)
    unnamed = sorted((o for o in out if o["custom_id"] is None), key=lambda o: o["error"]["line"])
    assert [(o["error"]["code"], o["error"]["line"], o["response"]) for o in unnamed] == [
        ("invalid_json", 4, None), ("invalid_request", 5, None), ("invalid_request", 6, None)]
    assert "line 4 is not valid JSON" in unnamed[0]["error"]["message"] and unnamed[2]["error"]["param"] == "custom_id"
    for custom_id, param in (("bad-url", "url"), ("bad-method", "method")):
        assert answers[custom_id]["response"] is None and answers[custom_id]["error"]["param"] == param, answers[custom_id]
    for custom_id, status, param in (("no-messages", 400, "messages"), ("other-model", 400, "model"), ("streamed", 400, "stream"),
                                     ("too-long", 400, "prompt"), ("not-embeddings", 400, "model")):
        response = answers[custom_id]["response"]
        assert answers[custom_id]["error"] is None and response["status_code"] == status, answers[custom_id]
        assert set(response["body"]["error"]) == {"message", "type", "param", "code"} and response["body"]["error"]["type"] == "invalid_request_error"
        assert response["body"]["error"]["param"] == param, response
    assert "context is 128 tokens" in answers["too-long"]["response"]["body"]["error"]["message"]


def test_embeddings_from_an_uploaded_file_equal_the_online_api(world, online):
    from lmaas.registry.files import FileStore

    texts = [f"sentence number {i} about {'cats' if i % 2 else 'the stock market'}" for i in range(12)]
    lines = [line(f"e{i}", "/v1/embeddings", {"model": "minilm", "input": [t, t.upper()] if i % 4 == 0 else t}) for i, t in enumerate(texts)]
    registry = world["registry"]
    upload = FileStore(registry.storage, registry.engine).create(io.BytesIO("".join(json.dumps(x) + "\n" for x in lines).encode()),
                                                                 filename="emb.jsonl", purpose="batch", tenant=TENANT)
    output = world["area"] / "emb-out.jsonl"
    result = run_batch(BatchConfig(input=upload.id, model="minilm", output=str(output), **SMALL), registry=registry, tenant=TENANT)
    answers = by_id(read_jsonl(output))
    assert (result.total, result.completed, result.model) == (12, 12, "minilm:1")
    for request in lines:
        body = answers[request["custom_id"]]["response"]["body"]
        status, expected = post(online + request["url"], request["body"])
        assert status == 200 and body["usage"] == expected["usage"] and body["model"] == "minilm"
        assert len(body["data"]) == len(expected["data"])
        for got, want in zip(body["data"], expected["data"]):
            assert got["index"] == want["index"] and np.allclose(got["embedding"], want["embedding"], atol=1e-5)


def test_refusals_come_before_anything_is_written(world, tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", mixed_lines(3))
    output = tmp_path / "out.jsonl"
    registry = world["registry"]
    with pytest.raises(NotFoundError) as info:  # another tenant's private model answers as a missing one
        run_batch(BatchConfig(input=str(source), model="tiny", output=str(output)), registry=registry, tenant="globex")
    assert info.value.param == "model"
    with pytest.raises(NotFoundError) as info:
        run_batch(BatchConfig(input=str(tmp_path / "missing.jsonl"), model="tiny", output=str(output)), registry=registry)
    assert info.value.param == "input" and "missing.jsonl" in info.value.message
    with pytest.raises(PermissionDeniedError) as info:  # a tenant reads its own uploads only, not the cluster's disks
        run_batch(BatchConfig(input=str(source), model="tiny", output=str(output)), registry=registry, tenant=TENANT)
    assert info.value.param == "input"
    output.write_text("earlier results\n")
    with pytest.raises(AlreadyExistsError) as info:
        run_batch(BatchConfig(input=str(source), model="tiny", output=str(output)), registry=registry)
    assert info.value.param == "output" and output.read_text() == "earlier results\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]


def test_the_cli_refuses_in_one_line(world, cli, lmaas_env, tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", mixed_lines(2))
    env = {**lmaas_env, "LMAAS_STORAGE": world["registry"].storage.uri, "LMAAS_DATABASE_URL": world["database_url"]}
    done = cli("batch", str(source), "--model", "tiny", "--output", str(tmp_path / "out.jsonl"), "--tenant", "globex", env=env)
    assert (done.returncode, done.stdout, done.stderr.strip()) == (1, "", "error: no model named 'tiny'")
    assert not (tmp_path / "out.jsonl").exists()


def test_the_cli_answers_with_a_summary_line(world, cli, lmaas_env, ray_cluster, tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", [*mixed_lines(4), "not json"])
    output = tmp_path / "out.jsonl"
    env = {**lmaas_env, "LMAAS_STORAGE": world["registry"].storage.uri, "LMAAS_DATABASE_URL": world["database_url"],
           "RAY_ADDRESS": ray_cluster.address_info["gcs_address"]}  # the session's cluster, as a user's running one
    done = cli("batch", str(source), "--model", "tiny", "--output", str(output), "--concurrency", "1", "--num-cpus", "0.5", env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"wrote 5 lines to {output}: 4 completed, 1 failed, by tiny:1 on 1 actor(s) in "), done.stdout
    out = read_jsonl(output)
    assert sorted(o["custom_id"] or "" for o in out) == ["", "req-0", "req-1", "req-2", "req-3"]


def test_lines_are_split_in_bounded_memory_and_numbered(tmp_path):
    """The reader's two passes (`plan_input`, then `read_range` per block) agree on every line and its number."""
    import pyarrow.fs as pafs
    from lmaas.batch.lines import split_lines
    from lmaas.batch.reader import LineRange, plan_input, read_range

    assert list(split_lines([b"ab\ncd", b"ef\n\nxyz"], max_line_bytes=4)) == [(b"ab", 3), (b"cdef", 5), (b"", 1), (b"xyz", 3)]
    assert list(split_lines([b"abcdefgh", b"ijk\nok\n"], max_line_bytes=4)) == [(None, 12), (b"ok", 3)]  # over-long: never held whole
    data = b'{"a": 1}\r\n\n  \n' + b"x" * 40 + b"\n\xff\xfe\nlast"
    (tmp_path / "in.jsonl").write_bytes(data)
    fs = pafs.LocalFileSystem()
    plan = plan_input(fs, [str(tmp_path / "in.jsonl")], lines_per_block=2, max_block_bytes=1 << 20, max_line_bytes=32)
    assert plan.rows == 4 and plan.bytes == len(data)
    assert [(r.first_line, r.rows) for r in plan.ranges] == [(1, 2), (5, 2)]
    assert plan.ranges[0].end == plan.ranges[1].start and plan.ranges[1].end == len(data)
    rows = [row for r in plan.ranges for row in read_range(fs, plan.paths[0], LineRange(0, r.start, r.end, r.first_line, r.rows), 32).to_pylist()]
    assert [(row["line"], row["text"], row["problem"]) for row in rows] == [
        (1, '{"a": 1}', None), (4, None, "line 4 is longer than 32 bytes"),
        (5, None, "line 5 is not UTF-8 text (bad byte at offset 0)"), (6, "last", None)]
    with pytest.raises(InvalidInputError, match="binary file"):
        (tmp_path / "bin.jsonl").write_bytes(b"\x1f\x8b\x08\x00\x00")
        plan_input(fs, [str(tmp_path / "bin.jsonl")], lines_per_block=2, max_block_bytes=1 << 20)
