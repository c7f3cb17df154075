"""The OpenAI fine-tuning API end to end, with the real `openai` client against a real Serve gateway.

Tenant `acme` imports a tiny random-weight Llama (`base`, served with adapters enabled), uploads chat JSONL
(`client.files.create`), creates a fine-tuning job (`client.fine_tuning.jobs.create`) and polls it until it
succeeded; the result is called by its `fine_tuned_model` name through `/v1/chat/completions`. Tenant `globex`
is the attacker: it can neither see, cancel nor call acme's jobs, files, base or result.

The gateway queues the job (`ops.queue`); the session cluster has no dashboard, so no Ray Jobs API to admit it
to: the queue's own `Admitter` is ticked here with `SubprocessJobs`, which runs a job's entrypoint
(`python -m lmaas.ops.queue ID`, what Ray's Jobs API runs on the head) as a subprocess attached to the session
cluster. One fine-tune (one Ray Train fit, ~30 s here) serves the whole module.
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
from conftest import REPO, free_port, wait_for  # noqa: E402
from serve_helpers import make_hf_causal_lm  # noqa: E402

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.timeout(900)

APP = "lmaas-fine-tuning-test"
KEYS = {  # name -> (tenant, scopes, secret)
    "acme": ("acme", ["inference", "models:read", "models:write"], "lmaas_ftacme_" + "a" * 40),
    "globex": ("globex", ["inference", "models:read", "models:write"], "lmaas_ftglobex_" + "g" * 40),
    "reader": ("acme", ["inference", "models:read"], "lmaas_ftreader_" + "r" * 40),
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
        wait_for(lambda: _status(url + "/healthz") == 200, 60, "Serve ingress")
        yield url, settings, admitter, jobs, base_dir
    finally:
        jobs.close()
        serve.shutdown()


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except OSError:
        return 0


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
