"""Run by test_data_memory.py in its own process: ingest a corpus several times the object store.

Starts its own local Ray cluster with a small `object_store_memory`, writes one synthetic corpus
per `--factors` entry (that many times the object store), ingests each and prints one JSON line:
per corpus its sizes, token counts (expected from the generator and seen by the ingest) and the
driver's RSS before and at its peak during that ingest.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _rss_peak_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


class _AnonPeak:
    """Peak of the driver's private memory (RssAnon: heap, Arrow buffers), sampled every 10 ms.

    VmHWM also counts pages of the object store the driver has mapped (RssShmem), which the
    object store size bounds on its own, and files read through the page cache.
    """

    def __init__(self) -> None:
        self.peak = self.start = _status_kib("RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, _status_kib("RssAnon"))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _status_kib("RssAnon"))


def _status_kib(field: str) -> int:
    return int(next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":")).split()[1])


def _rss_kib() -> int:
    return int(next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmRSS:")).split()[1])


def _reset_rss_peak() -> bool:
    try:  # Linux >= 4.0: writing 5 resets VmHWM to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def write_corpus(root: Path, total_bytes: int, words: list[str], files: int, seed: int = 0) -> tuple[int, int, int]:
    """`files` text files, one document per line; returns (bytes, documents, words written)."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    per_file = total_bytes // files
    size = docs = count = 0
    for f in range(files):
        lines, written = [], 0
        while written < per_file:
            n = rng.randint(200, 600)
            line = " " + " ".join(rng.choices(words, k=n))  # leading space: every word is "Ġword"
            lines.append(line)
            written += len(line) + 1
            docs += 1
            count += n
        data = "\n".join(lines) + "\n"
        (root / f"part-{f:04d}.txt").write_text(data)
        size += len(data)
    return size, docs, count


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--object-store-mb", type=int, default=80)
    parser.add_argument("--factors", default="1.5,4", help="corpus sizes, in object stores, ingested in this order")
    parser.add_argument("--files", type=int, default=64)
    parser.add_argument("--cpus-per-task", type=float, default=0.5)
    args = parser.parse_args()

    import ray
    from ray.data import DataContext

    from lmaas import db
    from lmaas.data import tokenizer as tok
    from lmaas.data.config import IngestConfig
    from lmaas.data.ingest import ingest
    from lmaas.storage import Storage

    work = Path(tempfile.mkdtemp(prefix="lmaas-memory-"))
    rng = random.Random(1)
    words = sorted({"".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(8, 14))) for _ in range(24)})
    # a tokenizer in which every word (alone or after a space) is one token: the expected count is exact
    sample = [" " + " ".join(rng.choices(words, k=400)) for _ in range(20)]
    spec = tok.train_bpe(sample, 2000)
    for w in words:
        assert len(tok.encode_batch(spec.json, [" " + w])[0]) == 1, w
    spec.save(work / "tokenizer")

    store_bytes = args.object_store_mb * 1024 * 1024
    factors = [float(f) for f in args.factors.split(",")]
    ray.init(address="local", num_cpus=2, object_store_memory=store_bytes, include_dashboard=False,
             log_to_driver=False, logging_level="warning")
    DataContext.get_current().enable_progress_bars = False
    try:
        storage = Storage(f"file://{work}/store")
        engine = db.connect(f"sqlite:///{work}/lmaas.db")
        config = IngestConfig(name="warm-up", sources=[str(work / "warm-up")], format="lines", tokenizer=str(work / "tokenizer"),
                              block_size=1024, validation_percent=5.0, batch_size=256, rows_per_shard=1024, cpus_per_task=args.cpus_per_task)
        # warm-up on a small corpus: the driver's first Ray Data run imports and caches ~100 MB of
        # modules, which is not what this measures
        write_corpus(work / "warm-up", 1_000_000, words, 2, seed=2)
        ingest(config, storage=storage, engine=engine)
        runs = []
        for i, factor in enumerate(factors):
            corpus_dir = work / f"corpus-{i}"
            started = time.monotonic()
            size, docs, count = write_corpus(corpus_dir, int(store_bytes * factor), words, args.files, seed=10 + i)
            generated_s = time.monotonic() - started
            rss_before = _rss_peak_kib() if not _reset_rss_peak() else _rss_kib()
            anon = _AnonPeak()
            started = time.monotonic()
            result = ingest(config.model_copy(update={"name": f"big-{i}", "sources": [str(corpus_dir)]}), storage=storage, engine=engine)
            ingest_s = time.monotonic() - started
            anon_peak = anon.stop()
            runs.append({
                "factor": factor,
                "corpus_bytes": size,
                "documents": docs,
                "expected_tokens": count,
                "ingested_documents": result.version.documents,
                "packed_tokens": result.version.tokens,
                "dropped_tokens": result.dropped_tokens,
                "driver_rss_before_kib": rss_before,
                "driver_rss_peak_kib": _rss_peak_kib(),
                "driver_anon_before_kib": anon.start,
                "driver_anon_peak_kib": anon_peak,
                "generate_s": round(generated_s, 1),
                "ingest_s": round(ingest_s, 1),
            })
            shutil.rmtree(corpus_dir)
            storage.delete(result.version.prefix)
        print(json.dumps({"object_store_bytes": store_bytes, "runs": runs}))
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
