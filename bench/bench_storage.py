"""Artifact store: lmaas's atomic, hashed publish/download against plain fsspec copies.

    python bench/bench_storage.py [--files 4 --mb 16 --repeats 3]

Baseline: `fs.put(dir, recursive=True)` / `fs.get(...)` with the same fsspec filesystem (no
hashing, no manifest, no atomicity). lmaas: `Storage.publish_dir` (sha256 of every file,
staged + renamed locally, claimed + manifest-last on S3) and `Storage.download_dir` (verifies
every sha256). Runs on a local directory and on a real S3-compatible server (moto on
127.0.0.1) started here. Prints time ratios (lmaas / baseline; 1.0 = no overhead) and writes
bench/results/storage.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")

from lmaas.storage import Storage  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
            return proc, endpoint
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto server did not start")


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_backend(storage: Storage, src: Path, repeats: int) -> dict[str, float]:
    fs = storage.fs
    rows: dict[str, list[float]] = {"baseline_put": [], "lmaas_publish": [], "baseline_get": [], "lmaas_download": []}
    for _ in range(repeats):
        base = f"bench-{uuid.uuid4().hex[:8]}"
        dest_plain = storage._full(f"{base}/plain")
        rows["baseline_put"].append(timed(lambda: fs.put(str(src) + "/", dest_plain, recursive=True)))
        rows["lmaas_publish"].append(timed(lambda: storage.publish_dir(src, f"{base}/lmaas")))
        with tempfile.TemporaryDirectory() as out:
            rows["baseline_get"].append(timed(lambda: fs.get(dest_plain + "/", out + "/plain/", recursive=True)))
            rows["lmaas_download"].append(timed(lambda: storage.download_dir(f"{base}/lmaas", out + "/lmaas")))
        storage.delete(base)
    med = {k: statistics.median(v) for k, v in rows.items()}
    return {
        **{f"{k}_s": round(v, 4) for k, v in med.items()},
        "publish_ratio": round(med["lmaas_publish"] / med["baseline_put"], 3),
        "download_ratio": round(med["lmaas_download"] / med["baseline_get"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--mb", type=int, default=16, help="size of each file")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="lmaas-bench-"))
    src = work / "src"
    src.mkdir()
    for i in range(args.files):
        (src / f"shard-{i}.bin").write_bytes(os.urandom(args.mb << 20))
    moto, endpoint = start_moto()
    try:
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
        results = {
            "file": bench_backend(Storage(f"file://{work / 'store'}"), src, args.repeats),
            "s3 (moto, 127.0.0.1)": bench_backend(Storage("s3://bench/x", endpoint_url=endpoint), src, args.repeats),
        }
    finally:
        moto.terminate()
        shutil.rmtree(work, ignore_errors=True)

    total_mb = args.files * args.mb
    print(f"artifact store: {args.files} files x {args.mb} MiB = {total_mb} MiB, median of {args.repeats}")
    print(f"{'backend':<22}{'put s':>8}{'publish s':>11}{'ratio':>7}{'get s':>8}{'download s':>12}{'ratio':>7}")
    for name, r in results.items():
        print(
            f"{name:<22}{r['baseline_put_s']:>8.3f}{r['lmaas_publish_s']:>11.3f}{r['publish_ratio']:>7.2f}"
            f"{r['baseline_get_s']:>8.3f}{r['lmaas_download_s']:>12.3f}{r['download_ratio']:>7.2f}"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "storage.json").write_text(
        json.dumps(
            {
                "benchmark": "storage",
                "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                "files": args.files,
                "mb_per_file": args.mb,
                "repeats": args.repeats,
                "results": results,
            },
            indent=1,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
