"""Offline batches: a JSONL of OpenAI batch requests answered on Ray Data by a pool of model actors.

    result = run_batch(BatchConfig(input="requests.jsonl", model="tiny-lm", output="answers.jsonl"), registry=registry)

`config` (the knobs), `lines` (one input line -> one output line, in OpenAI's batch formats), `reader` (the input as
blocks of lines), `worker` (the model actors), `run` (the pipeline and the driver that writes the output).
"""

from lmaas.batch.config import BatchConfig
from lmaas.batch.run import (
    BatchProgress,
    BatchResult,
    CheckedBatch,
    check_batch,
    run_batch,
)

__all__ = ["BatchConfig", "BatchProgress", "BatchResult", "CheckedBatch", "check_batch", "run_batch"]
