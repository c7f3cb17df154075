"""Memory stays bounded: a corpus several times the object store ingests without running out (own process)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SCRIPT = Path(__file__).with_name("bounded_memory_data.py")
OBJECT_STORE_MB = 80  # Ray's minimum is about 75 MB
FACTOR = 3.0


def test_ingest_of_a_corpus_several_times_the_object_store_completes_with_bounded_driver_memory():
    ray_tmp = tempfile.mkdtemp(prefix="lmm-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    try:
        result = subprocess.run(
            [sys.executable, str(SCRIPT), "--object-store-mb", str(OBJECT_STORE_MB), "--factor", str(FACTOR)],
            env=env, capture_output=True, text=True, timeout=240,
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["corpus_bytes"] >= 0.95 * FACTOR * report["object_store_bytes"]
    assert report["ingested_documents"] == report["documents"]
    # every word is one token and each document ends with EOS: packed + dropped tail == input
    assert report["packed_tokens"] + report["dropped_tokens"] == report["expected_tokens"] + report["documents"]
    # The driver's peak RSS growth is reported, not asserted: measured ~210 MB for a 84 MB corpus and
    # ~250 MB for a 250 MB one (mapped object-store pages and shard buffers count too); whether it
    # is flat in corpus size needs a larger run than this test can afford (open, see issue 4).
    print("driver RSS growth MiB:", (report["driver_rss_peak_kib"] - report["driver_rss_before_kib"]) / 1024)
