"""The OpenAI fine-tuning and Batch APIs end to end, with the real `openai` client against a real Serve gateway.

Tenant `acme` imports a tiny random-weight Llama (`base`, served with adapters enabled), uploads chat JSONL
(`client.files.create`), creates a fine-tuning job (`client.fine_tuning.jobs.create`) and polls it until it
succeeded; the result is called by its `fine_tuned_model` name through `/v1/chat/completions`. It then runs
batches of completion and chat lines on `base` (`client.batches.create`), whose answers must equal what the
gateway's online API answers the same requests. Tenant `globex` is the attacker: it can neither see, cancel nor
call acme's jobs, batches, files, base or result.

The gateway queues the jobs (`ops.queue`); the session cluster has no dashboard, so no Ray Jobs API to admit them
to: the queue's own `Admitter` is ticked here with `SubprocessJobs`, which runs a job's entrypoint
(`python -m lmaas.ops.queue ID`, what Ray's Jobs API runs on the head) as a subprocess attached to the session
cluster, and stops it with SIGTERM (as Ray's Jobs API does). One gateway and one fine-tune (one Ray Train fit,
~30 s here) serve the whole module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import REPO, free_port, http_status, wait_for  # noqa: E402
from serve_helpers import make_hf_causal_lm  # noqa: E402

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.timeout(900)

APP = "lmaas-fine-tuning-test"
KEYS = {  # name -> (tenant, scopes, secret)
    "acme": ("acme", ["inference", "models:read", "models:write"], "lmaas_ftacme_" + "a" * 40),
    "globex": ("globex", ["inference", "models:read", "models:write"], "lmaas_ftglobex_" + "g" * 40),
    "reader": ("acme", ["inference", "models:read"], "lmaas_ftreader_" + "r" * 40),
    "trainer": ("acme", ["models:read", "models:write"], "lmaas_fttrainer_" + "t" * 40),
}
ANSWER = "Open Settings, choose Security, then press Reset password."
SYSTEM = {"role": "system", "content": "You are the support desk."}


def chat_lines(numbers: range) -> bytes:
    return "\n".join(json.dumps({"messages": [SYSTEM, {"role": "user", "content": f"How do I reset my password? Ticket {i}."},
                                              {"role": "assistant", "content": ANSWER}]}) for i in numbers).encode()


class SubprocessJobs:
    """`ops.queue.JobsApi` that runs each job's entrypoint as a subprocess of this test, attached to the session cluster."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs, self.procs = env, logs, {}

    def submit(self, job, submission_id: str) -> None:  # noqa: ANN001 - a QueuedJob
        out = open(self.logs / f"{submission_id}.log", "w")  # noqa: SIM115 - the child writes it until it exits
        self.procs[submission_id] = subprocess.Popen([sys.executable, "-m", "lmaas.ops.queue", str(job.id)], env=self.env, cwd=REPO,
                                                     stdout=out, stderr=subprocess.STDOUT, text=True)

    def status(self, submission_id: str) -> tuple[str, str]:
        code = self.procs[submission_id].poll()
        if code is None:
            return "running", ""
        errors = [line for line in self.logs_of(submission_id).splitlines() if line.startswith("error:")]
        return ("succeeded", "") if code == 0 else ("failed", (errors or [f"exit status {code}"])[-1])

    def stop(self, submission_id: str) -> None:
        self.procs[submission_id].terminate()
        self.procs[submission_id].wait(30)

    def logs(self, submission_id: str) -> str:
        return self.logs_of(submission_id)

    def logs_of(self, submission_id: str) -> str:
        return (self.logs / f"{submission_id}.log").read_text()

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)


@pytest.fixture(scope="module")
def gateway(ray_cluster, tmp_path_factory):
    """(base URL, settings, admitter, jobs api, base model dir): the Serve gateway with acme's `base` served with adapters."""
    import ray
    from lmaas import db
    from lmaas.auth import KeyStore
    from lmaas.config import load_settings
    from lmaas.ops import queue
    from lmaas.registry import ModelRegistry
    from lmaas.serve.deployments import build_app, http_port, run_app
    from ray import serve

    root = tmp_path_factory.mktemp("fine-tuning")
    settings = load_settings(home=root / "home")
    registry = ModelRegistry.from_settings(settings)
    # weights of std 0.2, not transformers' 0.02: logits that small (~0.2) leave an adapter no room to move the loss
    base_dir = make_hf_causal_lm(root / "base", "llama", initializer_range=0.2)
    registry.register_version("base", base_dir, task="causal-lm", tenant="acme")  # acme's own import, private
    keys = KeyStore(db.connect(settings.database_url))
    for tenant, scopes, secret in KEYS.values():
        keys.create_key(tenant, scopes, create_tenant=True, secret=secret)
    models = [{"ref": "base:1", "name": "base", "num_cpus": 0.3, "refresh_interval_s": 0, "graceful_shutdown_timeout_s": 5,
               "engine": {"engine": "lmaas", "num_threads": 1, "max_batch_size": 8, "max_adapters": 2}}]
    env = {**os.environ, **settings.env(), "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    jobs = SubprocessJobs(env, root)
    admitter = queue.Admitter(db.connect(settings.database_url), jobs, queue.ray_resources)
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    try:
        run_app(build_app({"models": models, "ingress": {"num_cpus": 0.1}, "env": settings.env()}), APP)
        url = f"http://127.0.0.1:{http_port()}"
        wait_for(lambda: http_status(url + "/healthz") == 200, 60, "Serve ingress")
        yield url, settings, admitter, jobs, base_dir
    finally:
        jobs.close()
        serve.shutdown()


def client_of(gateway, name: str):  # noqa: ANN001, ANN201
    return openai.OpenAI(base_url=gateway[0] + "/v1", api_key=KEYS[name][2], max_retries=0, timeout=120)


def upload(client, data: bytes, name: str = "chat.jsonl", purpose: str = "fine-tune") -> str:  # noqa: ANN001
    return client.files.create(file=(name, data), purpose=purpose).id


def refused(error_type, call, param: str, *words: str) -> dict:  # noqa: ANN001
    with pytest.raises(error_type) as info:
        call()
    body = info.value.body
    assert body["param"] == param, body
    for word in words:
        assert word in body["message"], body["message"]
    return body


def test_bad_requests_are_4xx_naming_the_field_and_queue_nothing(gateway):
    from lmaas import db
    from lmaas.ops import queue

    acme, globex, reader = (client_of(gateway, n) for n in ("acme", "globex", "reader"))
    engine = db.connect(gateway[1].database_url)
    good = upload(acme, chat_lines(range(8)))
    notes = upload(acme, b"just some notes", "notes.txt", purpose="user_data")
    theirs = upload(globex, chat_lines(range(8)))
    create = acme.fine_tuning.jobs.create

    refused(openai.NotFoundError, lambda: create(model="no-such-model", training_file=good), "model", "no-such-model")
    refused(openai.NotFoundError, lambda: create(model="base", training_file="file-" + "0" * 24), "training_file")
    refused(openai.NotFoundError, lambda: create(model="base", training_file=theirs), "training_file", theirs)  # as if it did not exist
    refused(openai.NotFoundError, lambda: create(model="base", training_file=good, validation_file=theirs), "validation_file")
    refused(openai.BadRequestError, lambda: create(model="base", training_file=notes), "training_file", "purpose 'user_data'")
    refused(openai.PermissionDeniedError, lambda: create(model="base", training_file="/etc/passwd"), "training_file")
    refused(openai.BadRequestError, lambda: create(model="base", training_file=good, hyperparameters={"n_epochs": 0}),
            "hyperparameters.n_epochs", "1 to 100")
    refused(openai.BadRequestError, lambda: create(model="base", training_file=good, suffix="Not A Name"), "suffix")
    refused(openai.BadRequestError, lambda: create(model="base", training_file=good, extra_body={"lmaas": {"train": {"lr": 1}}}),
            "lmaas.train", "learning_rate_multiplier")
    refused(openai.NotFoundError, lambda: globex.fine_tuning.jobs.create(model="base", training_file=theirs), "model")  # acme's private base
    refused(openai.PermissionDeniedError, lambda: reader.fine_tuning.jobs.create(model="base", training_file=good), "authorization")
    assert queue.list_jobs(engine) == []  # nothing queued

    job = create(model="base", training_file=good, suffix="probe", metadata={"team": "support"})
    assert (job.status, job.model, job.training_file, job.organization_id, job.metadata) == ("queued", "base", good, "acme", {"team": "support"})
    assert job.id.startswith("ftjob-") and job.fine_tuned_model is None and job.hyperparameters.n_epochs == "auto"
    assert [j.id for j in acme.fine_tuning.jobs.list().data] == [job.id]
    assert globex.fine_tuning.jobs.list().data == []
    for call in (lambda: globex.fine_tuning.jobs.retrieve(job.id), lambda: globex.fine_tuning.jobs.cancel(job.id),
                 lambda: globex.fine_tuning.jobs.list_events(job.id), lambda: globex.fine_tuning.jobs.checkpoints.list(job.id)):
        refused(openai.NotFoundError, call, "fine_tuning_job_id")
    refused(openai.PermissionDeniedError, lambda: reader.fine_tuning.jobs.cancel(job.id), "authorization")
    assert queue.get(engine, int(job.id.removeprefix("ftjob-"))).state == "queued"  # the attacker changed nothing

    assert acme.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    refused(openai.BadRequestError, lambda: acme.fine_tuning.jobs.cancel(job.id), "fine_tuning_job_id", "already cancelled")
    events = acme.fine_tuning.jobs.list_events(job.id).data
    assert [e.message for e in events] == ["The job was cancelled", f"Created fine-tuning job: {job.id}"]  # newest first
    assert acme.fine_tuning.jobs.checkpoints.list(job.id).data == []


def test_upload_fine_tune_poll_and_chat_with_the_fine_tuned_model(gateway):
    from lmaas.registry import ModelRegistry

    _, settings, admitter, jobs, _ = gateway
    acme, globex = client_of(gateway, "acme"), client_of(gateway, "globex")
    training, validation = upload(acme, chat_lines(range(48))), upload(acme, chat_lines(range(100, 108)), "valid.jsonl")
    # a tiny random-weight base needs a big step: 100 x LoRA's 2e-4; one worker leaves the served base its CPUs
    job = acme.fine_tuning.jobs.create(model="base", training_file=training, validation_file=validation, suffix="support",
                                       hyperparameters={"n_epochs": 4, "batch_size": 8, "learning_rate_multiplier": 100},
                                       extra_body={"lmaas": {"train": {"num_workers": 1}}})
    started = time.monotonic()
    deadline = started + 600
    while job.status not in ("succeeded", "failed", "cancelled") and time.monotonic() < deadline:
        admitter.tick()
        time.sleep(1)
        job = acme.fine_tuning.jobs.retrieve(job.id)
    logs = "\n".join(jobs.logs_of(s) for s in jobs.procs)
    print(f"FINE-TUNE {job.status} in {time.monotonic() - started:.0f} s")
    assert job.status == "succeeded", (job.error, logs[-3000:])
    assert job.fine_tuned_model == "base-support:1" and job.trained_tokens > 0 and job.finished_at >= job.created_at
    assert job.hyperparameters.model_dump() == {"n_epochs": 4, "batch_size": 8, "learning_rate_multiplier": 100.0}

    events = acme.fine_tuning.jobs.list_events(job.id, limit=100).data[::-1]  # oldest first
    steps = [e.data for e in events if e.type == "metrics"]
    assert [s["step"] for s in steps] == [6, 12, 18, 24] and all(s["total_steps"] == 24 for s in steps)  # 48 examples / 8 a step
    assert steps[-1]["train_loss"] < steps[0]["train_loss"] - 2.0, steps  # the loss fell: measured 5.45 -> 1.25
    assert events[-2].message == "New fine-tuned model created: base-support:1"
    assert events[-1].message == "The job has successfully completed"
    page = acme.fine_tuning.jobs.list_events(job.id, limit=2)
    assert page.has_more and acme.fine_tuning.jobs.list_events(job.id, after=page.data[-1].id, limit=1).data[0].id == events[-3].id

    checkpoints = acme.fine_tuning.jobs.checkpoints.list(job.id).data  # newest first, the last 3 epochs
    assert [c.step_number for c in checkpoints] == [24, 18, 12]
    assert checkpoints[0].fine_tuned_model_checkpoint == job.fine_tuned_model
    assert checkpoints[0].metrics.train_loss == pytest.approx(steps[-1]["train_loss"])
    final = events[-2].data["metrics"]
    # the validation file's answers (held-out tickets) got likelier, measured against the base on the same tokens
    assert checkpoints[0].metrics.full_valid_loss == pytest.approx(final["full_valid_loss"])
    print(f"VALID-LOSS base {final['base_valid_loss']:.3f} -> tuned {final['full_valid_loss']:.3f}")
    # measured 7.04 -> 2.35, and the answer tokens the greedy choice gets right 0 % -> 64 %
    assert final["full_valid_loss"] < final["base_valid_loss"] - 2.0, final
    assert final["full_valid_mean_token_accuracy"] > final["base_valid_mean_token_accuracy"] + 0.3, final

    adapter = ModelRegistry.from_settings(settings).resolve("base-support:1")
    assert (adapter.task, adapter.parents, adapter.tenant) == ("adapter", ("base:1",), "acme")

    # the result is a model: by name, through the deployment of its base; its answers are not the base's
    prompt = [SYSTEM, {"role": "user", "content": "How do I reset my password? Ticket 7."}]
    answers = {m: acme.chat.completions.create(model=m, messages=prompt, max_tokens=12, temperature=0).choices[0].message.content
               for m in ("base", job.fine_tuned_model)}
    print(f"ANSWERS {answers}")
    assert answers["base"] != answers[job.fine_tuned_model]
    assert answers[job.fine_tuned_model].startswith("Open Set")  # measured "Open Setttings," (greedy, 12 tokens); the base's is noise
    refused(openai.NotFoundError, lambda: globex.chat.completions.create(model=job.fine_tuned_model, messages=prompt, max_tokens=2), "model")


def test_shipped_config_validates_and_cli_errors_are_one_line(cli, lmaas_env):
    from lmaas.config import load_config
    from lmaas.train.finetune import FineTuneConfig

    config = load_config(FineTuneConfig, REPO / "jobs" / "configs" / "finetune_lora.yaml")
    assert (config.method, config.result_name) == ("lora", "base-support")
    for args, words in ((("finetune", "jobs/configs/finetune_lora.yaml", "--model", "no-such-model"), "no model named 'no-such-model'"),
                        (("finetune",), "model"),
                        (("finetune", "jobs/configs/finetune_lora.yaml", "--set", "train.max_steps=5"), "use hyperparameters.n_epochs")):
        result = cli(*args, env=lmaas_env)
        assert result.returncode == 1 and words in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


# ---- the Batch API ----


def batch_line(i: int, **body) -> dict:  # noqa: ANN003
    """Completions on odd lines, chat on even ones, greedy, on acme's `base`."""
    if i % 2:
        request = {"model": "base", "prompt": f"def f{i}(x):", "max_tokens": 4 + i % 5, "temperature": 0, **body}
        return {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/completions", "body": request}
    messages = [{"role": "user", "content": f"print {i} numbers"}]
    request = {"model": "base", "messages": messages, "max_tokens": 4 + i % 5, "temperature": 0, **body}
    return {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions", "body": request}


def jsonl(lines: list[dict]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def post_json(url: str, secret: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {secret}"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def run_until(gateway, client, batch_id: str, done, timeout: float = 300):  # noqa: ANN001, ANN201
    """Tick the admitter and poll the batch until `done(batch)`; returns the batch."""
    _, _, admitter, jobs, _ = gateway
    deadline = time.monotonic() + timeout
    batch = client.batches.retrieve(batch_id)
    while not done(batch) and time.monotonic() < deadline:
        admitter.tick()
        time.sleep(0.5)
        batch = client.batches.retrieve(batch_id)
    assert done(batch), (batch, "\n".join(jobs.logs_of(s) for s in jobs.procs)[-3000:])
    return batch


def lines_of(client, file_id: str) -> list[dict]:  # noqa: ANN001
    return [json.loads(text) for text in client.files.content(file_id).text.splitlines()]


ANSWER_FIELDS = ("object", "model", "choices", "usage")
BATCH_OPTIONS = {"concurrency": 1, "num_cpus": 0.5, "lines_per_block": 16, "engine": {"engine": "lmaas", "num_threads": 1}}
"""One actor beside the served base; lmaas's engine, as the gateway serves `base` with (greedy answers must match)."""


def test_bad_batches_are_4xx_naming_the_field_and_queue_nothing(gateway):
    from lmaas import db
    from lmaas.ops import queue

    acme, globex, trainer = (client_of(gateway, n) for n in ("acme", "globex", "trainer"))
    engine = db.connect(gateway[1].database_url)
    before = queue.list_jobs(engine, kind="batch")
    good = upload(acme, jsonl([batch_line(i) for i in range(4)]), "requests.jsonl", purpose="batch")
    chat = upload(acme, chat_lines(range(4)))
    two_models = upload(acme, jsonl([batch_line(1), batch_line(2, model="other")]), "two.jsonl", purpose="batch")
    no_model = upload(acme, jsonl([batch_line(1, model=None)]).replace(b'"model": null, ', b""), "none.jsonl", purpose="batch")
    theirs = upload(globex, jsonl([batch_line(1)]), "theirs.jsonl", purpose="batch")  # globex asks for acme's private base
    create = acme.batches.create

    refused(openai.BadRequestError, lambda: create(input_file_id=chat, endpoint="/v1/completions", completion_window="24h"),
            "input_file_id", "purpose 'fine-tune'")
    refused(openai.BadRequestError, lambda: create(input_file_id="requests.jsonl", endpoint="/v1/completions", completion_window="24h"),
            "input_file_id")
    refused(openai.NotFoundError, lambda: create(input_file_id=theirs, endpoint="/v1/completions", completion_window="24h"),
            "input_file_id")  # another tenant's file: as if it did not exist
    refused(openai.BadRequestError, lambda: create(input_file_id=good, endpoint="/v1/images", completion_window="24h"), "endpoint")
    refused(openai.BadRequestError, lambda: create(input_file_id=good, endpoint="/v1/completions", completion_window="1h"),
            "completion_window")
    refused(openai.BadRequestError, lambda: create(input_file_id=two_models, endpoint="/v1/completions", completion_window="24h"),
            "input_file_id", "'other'", "line 2")
    refused(openai.BadRequestError, lambda: create(input_file_id=no_model, endpoint="/v1/completions", completion_window="24h"),
            "input_file_id", "lmaas.model")
    refused(openai.NotFoundError, lambda: create(input_file_id=good, endpoint="/v1/completions", completion_window="24h",
                                                 extra_body={"lmaas": {"model": "no-such-model"}}), "model", "no-such-model")
    refused(openai.BadRequestError, lambda: create(input_file_id=good, endpoint="/v1/completions", completion_window="24h",
                                                   extra_body={"lmaas": {"concurrency": 0}}), "lmaas.concurrency")
    refused(openai.BadRequestError, lambda: create(input_file_id=good, endpoint="/v1/completions", completion_window="24h",
                                                   extra_body={"lmaas": {"num_cpus": 64}}), "lmaas.concurrency", "could never start")
    refused(openai.PermissionDeniedError, lambda: create(input_file_id=good, endpoint="/v1/completions", completion_window="24h",
                                                         extra_body={"lmaas": {"engine": {"engine_kwargs": {"tokenizer": "/etc"}}}}),
            "lmaas.engine.engine_kwargs", "only an admin")
    refused(openai.NotFoundError, lambda: globex.batches.create(input_file_id=theirs, endpoint="/v1/completions", completion_window="24h"),
            "model")  # acme's private base, named in globex's own file
    refused(openai.PermissionDeniedError, lambda: trainer.batches.create(input_file_id=good, endpoint="/v1/completions",
                                                                         completion_window="24h"), "authorization")
    assert queue.list_jobs(engine, kind="batch") == before  # nothing queued
    refused(openai.NotFoundError, lambda: acme.batches.retrieve("batch_999999"), "batch_id")
    refused(openai.NotFoundError, lambda: acme.batches.retrieve("ftjob-1"), "batch_id")


def test_a_batch_of_completions_and_chat_equals_the_online_api_and_counts_as_batch_usage(gateway):
    url = gateway[0]
    acme, globex = client_of(gateway, "acme"), client_of(gateway, "globex")
    lines = [batch_line(i) for i in range(100)]
    bad = [batch_line(100, max_tokens=-5), batch_line(101, temperature="hot"),
           {"custom_id": "req-102", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "base"}}]  # no messages
    file_id = upload(acme, jsonl(lines[:50] + bad + lines[50:]), "mixed.jsonl", purpose="batch")
    batch = acme.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h",
                                metadata={"run": "nightly"}, extra_body={"lmaas": BATCH_OPTIONS})
    assert (batch.status, batch.input_file_id, batch.metadata, batch.endpoint) == ("validating", file_id, {"run": "nightly"},
                                                                                   "/v1/chat/completions")
    assert batch.id.startswith("batch_") and batch.expires_at == batch.created_at + 24 * 3600 and batch.output_file_id is None
    assert [b.id for b in acme.batches.list().data][0] == batch.id
    assert globex.batches.list().data == []
    refused(openai.NotFoundError, lambda: globex.batches.retrieve(batch.id), "batch_id")
    refused(openai.NotFoundError, lambda: globex.batches.cancel(batch.id), "batch_id")

    started = time.monotonic()
    batch = run_until(gateway, acme, batch.id, lambda b: b.status in ("completed", "failed", "cancelled"))
    print(f"BATCH {batch.status} in {time.monotonic() - started:.0f} s")
    assert batch.status == "completed", batch.errors
    assert batch.request_counts.model_dump() == {"total": 103, "completed": 100, "failed": 3}
    assert batch.model == "base:1" and batch.completed_at >= batch.in_progress_at >= batch.created_at

    out = lines_of(acme, batch.output_file_id)
    assert len(out) == 100 and sorted(o["custom_id"] for o in out) == sorted(line["custom_id"] for line in lines)  # each once
    assert all(o["response"]["status_code"] == 200 and o["error"] is None for o in out)
    errors = {o["custom_id"]: o for o in lines_of(acme, batch.error_file_id)}
    assert sorted(errors) == ["req-100", "req-101", "req-102"]
    assert {k: (e["response"]["status_code"], e["response"]["body"]["error"]["param"]) for k, e in errors.items()} == {
        "req-100": (400, "max_tokens"), "req-101": (400, "temperature"), "req-102": (400, "messages")}
    files = {f.id: f for f in acme.files.list(purpose="batch_output").data}
    assert files[batch.output_file_id].filename == "output.jsonl" and files[batch.error_file_id].filename == "errors.jsonl"

    # every answer equals the online API's answer to the same request (greedy), ids and timestamps aside
    from concurrent.futures import ThreadPoolExecutor

    def online(line: dict) -> dict:
        status, body = post_json(url + line["url"], KEYS["acme"][2], line["body"])
        assert status == 200, body
        return body

    with ThreadPoolExecutor(4) as pool:
        expected = dict(zip((line["custom_id"] for line in lines), pool.map(online, lines), strict=True))
    for o in out:
        got, want = o["response"]["body"], expected[o["custom_id"]]
        assert {k: got[k] for k in ANSWER_FIELDS} == {k: want[k] for k in ANSWER_FIELDS}, o["custom_id"]

    prompt = sum(o["response"]["body"]["usage"]["prompt_tokens"] for o in out)
    completion = sum(o["response"]["body"]["usage"]["completion_tokens"] for o in out)
    assert (batch.usage.input_tokens, batch.usage.output_tokens) == (prompt, completion)
    # usage: the batch's tokens apart from the online requests', billed at half (LMAAS_BATCH_TOKEN_DISCOUNT's default)
    request = urllib.request.Request(url + "/api/v1/usage?model=base", headers={"Authorization": f"Bearer {KEYS['acme'][2]}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        usage = json.loads(response.read())["total"]
    assert (usage["batch_requests"], usage["batch_prompt_tokens"], usage["batch_completion_tokens"]) == (103, prompt, completion)
    assert usage["requests"] >= 100  # the online comparison above
    assert usage["billable_tokens"] == usage["total_tokens"] + -(-(prompt + completion) // 2)

    # acme's results are acme's: globex can neither read nor delete them
    refused(openai.NotFoundError, lambda: globex.files.content(batch.output_file_id), "file_id")
    refused(openai.NotFoundError, lambda: globex.files.delete(batch.output_file_id), "file_id")
    assert len(lines_of(acme, batch.output_file_id)) == 100
    refused(openai.BadRequestError, lambda: acme.batches.cancel(batch.id), "batch_id", "already succeeded")


def test_a_cancelled_batch_keeps_the_lines_it_answered(gateway):
    acme, globex = client_of(gateway, "acme"), client_of(gateway, "globex")
    lines = [batch_line(i, max_tokens=32) for i in range(3000)]  # ~15 s of work: the cancel comes long before the end
    file_id = upload(acme, jsonl(lines), "long.jsonl", purpose="batch")
    batch = acme.batches.create(input_file_id=file_id, endpoint="/v1/completions", completion_window="24h",
                                extra_body={"lmaas": BATCH_OPTIONS})
    batch = run_until(gateway, acme, batch.id, lambda b: b.request_counts.completed >= 48)  # some blocks written, most to go
    assert batch.status == "in_progress" and batch.request_counts.total == 3000
    refused(openai.NotFoundError, lambda: globex.batches.cancel(batch.id), "batch_id")  # the attacker stops nothing
    assert acme.batches.retrieve(batch.id).status == "in_progress"

    cancelling = acme.batches.cancel(batch.id)  # SIGTERM to the job's driver, which publishes what it has
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at is not None
    batch = run_until(gateway, acme, batch.id, lambda b: b.status == "cancelled", timeout=60)
    done = batch.request_counts.completed
    assert 48 <= done < 3000 and batch.request_counts.failed == 0 and batch.cancelled_at is not None
    out = lines_of(acme, batch.output_file_id)
    ids = [o["custom_id"] for o in out]
    assert len(ids) == len(set(ids)) == done  # every answered line once, whole
    assert set(ids) <= {line["custom_id"] for line in lines} and all(o["response"]["status_code"] == 200 for o in out)
    assert batch.error_file_id is None and batch.usage.output_tokens == sum(o["response"]["body"]["usage"]["completion_tokens"] for o in out)
