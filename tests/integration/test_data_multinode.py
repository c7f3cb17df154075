"""Ingest, training feed and an offline batch on a 2-node Ray cluster simulated on this machine (own process)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

SCRIPT = Path(__file__).with_name("multinode_data.py")


def test_tokenize_and_batches_spread_over_nodes_and_workers_get_disjoint_shards():
    ray_tmp = tempfile.mkdtemp(prefix="lmr-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    env.pop("RAY_ADDRESS", None)
    try:
        result = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=300)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert result.returncode == 0, result.stderr[-3000:]
    # the report is the script's last JSON line (the raylet may print warnings to stdout after it)
    report = json.loads([line for line in result.stdout.splitlines() if line.startswith("{")][-1])
    assert report["nodes"] == 2
    assert len(report["tokenize_nodes"]) == 2, report["tokenize_nodes"]
    first, second = (Counter(rows) for rows in ((tuple(r) for r in w) for w in report["worker_rows"]))
    assert sum(first.values()) > 0 and sum(second.values()) > 0
    expected = Counter(tuple(r) for r in report["expected_rows"])
    assert sum(expected.values()) == report["train_rows"]
    assert first + second == expected  # together: the whole training split, each row once
    # the batch ran on both nodes: each answered blocks, and together every line once
    blocks = report["batch_blocks_per_node"]
    assert sorted(blocks) == sorted(report["node_ids"]) and all(n > 0 for n in blocks.values()), blocks
    assert sum(blocks.values()) == 10 and report["batch_completed"] == 40
    assert sorted(report["batch_ids"]) == sorted(f"r{i}" for i in range(40))
