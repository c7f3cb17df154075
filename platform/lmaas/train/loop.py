"""The per-worker training function Ray Train runs on every worker (`train_func(config)`).

Ray-specific steps are marked `# Ray Train:`; the rest is a plain PyTorch loop: AdamW, cosine
schedule with warmup, gradient clipping and accumulation, bf16 autocast on GPU, DDP or FSDP2.

With a `teacher` in the loop config the same loop distills: every worker loads the teacher
from its registry artifact directory (frozen, eval mode, no grad, same dtype and autocast as
the student) and the loss becomes `distillation_loss` (KL to the teacher at a temperature plus
the LM loss). Checkpoints, resume and restarts are the training ones: only the student trains.

With `method: lora` the base loads from its registry artifact on every (re)start, PEFT wraps it
(`lmaas.train.lora`), and only the adapter's factors are optimized, checkpointed and restored.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from lmaas.models import build_model, config_from_dict, decoder_layers, flops_per_token
from lmaas.train import checkpoint
from lmaas.train.config import TrainConfig

# Dense bf16 peak TFLOP/s by GPU name, for MFU; LMAAS_PEAK_TFLOPS overrides.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0, "A10": 125.0, "V100": 125.0, "T4": 65.0}


def lr_factor(step: int, config: TrainConfig) -> float:
    """Learning-rate multiplier at `step` (0-based): linear warmup, then cosine to `min_lr_ratio`."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(1, config.max_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def distillation_loss(student_logits: Any, teacher_logits: Any, lm_loss: Any, *, temperature: float, alpha: float) -> Any:
    """`alpha * KL(teacher || student) * T^2 + (1 - alpha) * lm_loss`, the KL averaged over token positions.

    Both distributions are softened by `temperature`; the T^2 factor keeps the KL gradients on the
    scale of the LM loss's as T changes (Hinton et al., 2015).
    """
    import torch.nn.functional as F

    vocab = student_logits.shape[-1]
    student = F.log_softmax(student_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    kl = F.kl_div(student, teacher, log_target=True, reduction="batchmean")  # sum over vocab, mean over positions
    return alpha * kl * temperature**2 + (1 - alpha) * lm_loss


def peak_flops(device: Any) -> float | None:
    """Peak FLOP/s of one accelerator for MFU, or None on CPU / unknown GPUs."""
    if os.environ.get("LMAAS_PEAK_TFLOPS"):
        return float(os.environ["LMAAS_PEAK_TFLOPS"]) * 1e12
    if getattr(device, "type", "cpu") != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def train_func(loop_config: dict[str, Any]) -> None:
    """Train on this worker's shard; report metrics every `log_interval` steps and checkpoints."""
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist
    from ray.train import Checkpoint, CheckpointUploadMode

    cfg = TrainConfig(**loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()  # Ray Train: this worker's GPU, or CPU
    if device.type == "cpu":
        torch.set_num_threads(cfg.threads_per_worker)
    model_config = config_from_dict(loop_config["model_config"])
    tokenizer_dir = tempfile.mkdtemp(prefix="lmaas-tokenizer-")  # copied into every checkpoint
    for name, text in loop_config["tokenizer_files"].items():
        (Path(tokenizer_dir) / name).write_text(text)
    queue = loop_config.get("progress")
    fault = loop_config.get("fault")
    recorder = None
    if rank == 0:  # Prometheus gauges through Ray's metrics system (`lmaas.ops.metrics`)
        from lmaas.ops.metrics import TrainMetrics

        recorder = TrainMetrics(loop_config.get("run_id") or ctx.get_experiment_name(), cfg.output_model or cfg.model)

    distill = loop_config.get("teacher")
    teacher = _load_registered(distill, device).requires_grad_(False).eval() if distill else None

    base = build_model(model_config, seed=cfg.seed)
    init = loop_config.get("init")
    # fine-tune: start from the base model's weights (a full checkpoint holds them all; an adapter's does not)
    if cfg.lora.quantize_base == "nf4":  # QLoRA: the frozen base in 4-bit on this worker's GPU
        base = _load_registered(init, device, nf4=True)
    elif init is not None and (cfg.method == "lora" or ray.train.get_checkpoint() is None):
        base.load_state_dict(_load_registered(init, "cpu").state_dict())
    if cfg.method == "lora":
        from lmaas.train import lora

        base = lora.wrap(base, cfg.lora, base_ref=init["ref"])
    model = _wrap(base, cfg, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        fused=device.type == "cuda",
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))

    state = checkpoint.TrainerState()
    resumed = ray.train.get_checkpoint()  # Ray Train: the latest checkpoint after a restart or --resume
    if resumed is not None:
        with resumed.as_directory() as directory:
            state = checkpoint.restore(directory, model=model, base_model=base, optimizer=optimizer, scheduler=scheduler)
        state.restarts += 1
    if cfg.compile:
        model = torch.compile(model)

    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.precision == "bf16" else nullcontext()
    seq_len = model_config.max_position_embeddings
    flops = flops_per_token(model_config, seq_len)
    peak = peak_flops(device)
    validation = _validation_rows(loop_config.get("validation"), rank, world, device)
    batches = _batches(cfg, state, device, keep=bool(loop_config.get("keep_shard")))  # Ray Train: this worker's shard

    interval_loss, interval_lm_loss, interval_count, interval_tokens, interval_time = 0.0, 0.0, 0, 0, 0.0
    stall: float | None = None
    while state.step < cfg.max_steps:
        started = time.perf_counter()
        model.train()
        step_loss = step_lm_loss = 0.0
        for micro in range(cfg.grad_accum):
            input_ids, labels = next(batches)
            with _no_sync(model, last=micro == cfg.grad_accum - 1):
                with autocast:
                    out = model(input_ids=input_ids, labels=labels)
                    loss = out.loss
                    if teacher is not None:
                        with torch.no_grad():
                            teacher_logits = teacher(input_ids=input_ids, use_cache=False).logits
                        loss = distillation_loss(out.logits, teacher_logits, out.loss,
                                                 temperature=distill["temperature"], alpha=distill["alpha"])
                    loss = loss / cfg.grad_accum
                loss.backward()
            step_loss += loss.item()
            step_lm_loss += out.loss.item() / cfg.grad_accum
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        step_tokens = cfg.batch_size * cfg.grad_accum * seq_len
        state.tokens += step_tokens * world
        interval_loss += step_loss
        interval_lm_loss += step_lm_loss
        interval_count += 1
        interval_tokens += step_tokens
        interval_time += time.perf_counter() - started

        if fault and fault["rank"] == rank and state.step == fault["step"] and not os.path.exists(fault["marker"]):
            Path(fault["marker"]).write_text(f"killed rank {rank} at step {state.step}\n")
            os.kill(os.getpid(), signal.SIGKILL)  # a real worker death, once (chaos testing)

        last = state.step == cfg.max_steps
        if not (last or state.step % cfg.log_interval == 0 or state.step % cfg.checkpoint_interval == 0):
            continue
        worker_tps = interval_tokens / interval_time if interval_time else 0.0
        count = max(1, interval_count)
        totals = torch.tensor([interval_loss / count, worker_tps, interval_lm_loss / count], dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(totals)
        metrics: dict[str, Any] = {
            "step": state.step,
            "epoch": state.epoch,
            "tokens": state.tokens,
            "loss": totals[0].item() / world,
            "lr": lr,
            "tokens_per_s": totals[1].item(),
            "tokens_per_s_per_worker": totals[1].item() / world,
            "restarts": state.restarts,
            "peak_memory_mb": _peak_memory_mb(device),
        }
        if teacher is not None:
            metrics["lm_loss"] = totals[2].item() / world  # the student's own next-token loss, inside `loss`
        if peak:
            metrics["mfu"] = flops * worker_tps / peak
        if validation is not None and (last or state.step % cfg.eval_interval == 0):
            metrics["val_loss"] = _evaluate(model, validation, autocast, cfg.batch_size)
            metrics["val_ppl"] = math.exp(min(metrics["val_loss"], 50.0))
        interval_loss, interval_lm_loss, interval_count, interval_tokens, interval_time = 0.0, 0.0, 0, 0, 0.0

        if stall is not None:
            metrics["checkpoint_stall_s"] = stall  # of the previous checkpoint
        if last or state.step % cfg.checkpoint_interval == 0:
            save_started = time.perf_counter()
            state.history.append(dict(metrics))
            written = checkpoint.save(
                None, model=model, base_model=base,
                optimizer=optimizer, scheduler=scheduler, state=state, tokenizer_dir=tokenizer_dir, rank=rank,
            )
            metrics["checkpoint_save_s"] = time.perf_counter() - save_started
            # Ray Train: persist rank 0's directory; ASYNC uploads it in the background, then deletes it
            ray.train.report(
                metrics,
                checkpoint=Checkpoint.from_directory(str(written)) if written else None,
                checkpoint_upload_mode=CheckpointUploadMode.ASYNC,
            )
            # how long training waited for this checkpoint (gather + write + hand-off to the uploader)
            stall = time.perf_counter() - save_started
        else:
            state.history.append(dict(metrics))
            ray.train.report(metrics)  # Ray Train: a barrier; every rank reports equally often
        if recorder is not None:
            recorder.report(metrics)
        if rank == 0 and queue is not None:
            queue.put(metrics)
    shutil.rmtree(tokenizer_dir, ignore_errors=True)  # each checkpoint holds its copy


def _peak_memory_mb(device: Any) -> float:
    """This worker's peak memory so far: allocated GPU memory, or the process's peak RSS on CPU."""
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _load_registered(spec: dict[str, Any], device: Any, *, nf4: bool = False) -> Any:
    """A registered model from its artifact directory, every file's sha256 checked: a distillation's
    teacher or a fine-tune's starting point.

    Every worker holds a whole replica of a teacher (also under FSDP: only the student is sharded).
    It keeps the dtype it was stored in (fp32 for the lmaas family) and runs under the student's autocast.
    `nf4`: a QLoRA base, quantized to 4-bit NF4 by bitsandbytes as it loads (bf16 compute), on `device` (a GPU).
    """
    from lmaas.errors import IntegrityError
    from lmaas.models import load_model
    from lmaas.storage import Storage

    directory = tempfile.mkdtemp(prefix="lmaas-teacher-")
    manifest = Storage(spec["storage_uri"], endpoint_url=spec["endpoint_url"]).download_dir(spec["prefix"], directory)
    if manifest.sha256 != spec["manifest_sha256"]:
        raise IntegrityError(f"{spec['ref']}: the stored manifest under {spec['prefix']} was altered")
    if nf4:
        import torch
        from peft import prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(directory, quantization_config=quantization, device_map={"": device},
                                                     use_safetensors=True)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model = load_model(directory, device=str(device))
    shutil.rmtree(directory, ignore_errors=True)
    return model


def _wrap(model: Any, cfg: TrainConfig, device: Any) -> Any:
    """DDP through Ray Train, or FSDP2 (`fully_shard` each decoder layer, then the root)."""
    import ray.train.torch

    if cfg.strategy == "ddp":
        return ray.train.torch.prepare_model(model)  # Ray Train: move to device, wrap in DDP
    from torch.distributed.fsdp import fully_shard

    model.to(device)
    for layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(model)
    return model


def _no_sync(model: Any, *, last: bool) -> Any:
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulated step."""
    if last:
        return nullcontext()
    if hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2: re-enabled before the last micro-batch

        class _Paused:
            def __enter__(self) -> None:
                model.set_requires_gradient_sync(False)

            def __exit__(self, *exc: object) -> None:
                model.set_requires_gradient_sync(True)

        return _Paused()
    return nullcontext()


def _batches(cfg: TrainConfig, state: checkpoint.TrainerState, device: Any, *, keep: bool):  # noqa: ANN202 - generator
    """Endless micro-batches (input ids, labels) of this worker's shard; each pass over it is one epoch.

    The first pass streams the shard from Ray Data. With `keep` (a small shard, e.g. a fine-tuning
    set: `run.KEEP_SHARD_BYTES`; decided on the driver, so every rank stops streaming alike and Ray
    Data's split never waits for a rank that left) it is kept on the CPU meanwhile, and later epochs
    shuffle it in full (seeded by epoch) and batch it here: streaming it again starts a Ray Data
    execution per epoch, which for a small shard costs more than the steps it feeds. Otherwise the
    shard streams every epoch, through the local shuffle buffer.
    """
    import ray.train

    shard = ray.train.get_dataset_shard("train")
    kept: list[tuple[Any, Any]] | None = [] if keep else None
    while True:
        if kept:
            yield from _replay(kept, cfg, state, device)
            state.epoch += 1
            continue
        seen = 0
        for batch in shard.iter_torch_batches(
            batch_size=cfg.batch_size,
            drop_last=True,
            device=device,
            local_shuffle_buffer_size=cfg.shuffle_buffer or None,
            local_shuffle_seed=(cfg.seed * 1000 + state.epoch) if cfg.shuffle_buffer else None,
        ):
            seen += 1
            # a chat dataset's labels are -100 where the loss skips a token (prompts, padding); else every token counts
            ids, labels = batch["input_ids"], batch.get("labels")
            if kept is not None:
                kept.append((ids.cpu(), None if labels is None else labels.cpu()))
            yield ids, ids if labels is None else labels
        if seen == 0:
            raise RuntimeError(f"this worker's training shard has fewer than batch_size={cfg.batch_size} rows")
        state.epoch += 1


def _replay(kept: list[tuple[Any, Any]], cfg: TrainConfig, state: checkpoint.TrainerState, device: Any):  # noqa: ANN202
    """One epoch over a kept shard: every row once, in a full shuffle seeded by the epoch (unless shuffle_buffer is 0)."""
    import torch

    ids = torch.cat([k[0] for k in kept])
    labels = torch.cat([k[1] for k in kept]) if kept[0][1] is not None else None
    order = (torch.randperm(len(ids), generator=torch.Generator().manual_seed(cfg.seed * 1000 + state.epoch))
             if cfg.shuffle_buffer else torch.arange(len(ids)))
    for start in range(0, len(ids) - cfg.batch_size + 1, cfg.batch_size):
        rows = order[start : start + cfg.batch_size]
        batch = ids[rows].to(device)
        yield batch, (labels[rows].to(device) if labels is not None else batch)


def _validation_rows(rows_ref: Any, rank: int, world: int, device: Any) -> Any:
    """This rank's share of the fixed validation set (the same rows at every evaluation): (input ids, labels)."""
    import ray
    import torch

    if rows_ref is None:
        return None
    data = ray.get(rows_ref)
    ids = torch.as_tensor(data["input_ids"], dtype=torch.int64)
    labels = torch.as_tensor(data["labels"], dtype=torch.int64) if "labels" in data else ids
    # Every rank runs the same number of equal forward passes: FSDP's forward is a collective.
    per_rank = len(ids) // world
    mine = slice(rank * per_rank, (rank + 1) * per_rank) if per_rank else slice(None)  # too few: all ranks use all rows
    return ids[mine].to(device), labels[mine].to(device)


def _evaluate(model: Any, rows: Any, autocast: Any, batch_size: int) -> float:
    """Mean validation loss over every rank's rows (a collective)."""
    import torch
    import torch.distributed as dist

    model.eval()
    ids, labels = rows
    total = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad(), autocast:
        for chunk, chunk_labels in zip(ids.split(batch_size), labels.split(batch_size)):
            loss = model(input_ids=chunk, labels=chunk_labels).loss
            total += torch.tensor([loss.item() * len(chunk), len(chunk)], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(total)
    return (total[0] / total[1]).item()
