"""`bench/report.py`: the table of ratios, the report file and the README block it refreshes."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def load_report_module():
    spec = importlib.util.spec_from_file_location("bench_report", REPO / "bench" / "report.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_report"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_report_tables_ratios_marks_targets_and_refreshes_the_readme(tmp_path):
    report = load_report_module()
    results = tmp_path / "results"
    results.mkdir()
    (results / "data_ingest.json").write_text(json.dumps(
        {"tokens": 1000, "ray_tokens_per_s": 300.0, "baseline_tokens_per_s": 200.0, "ratio": 1.5}))
    level = {"concurrency": 32, "texts_per_s": 10.0}
    (results / "serve_embeddings.json").write_text(json.dumps({"baseline": [level], "lmaas": [{**level, "texts_per_s": 20.0}]}))
    (results / "engine_batching.json").write_text(json.dumps({"parameters": 12_900_000, "levels": [
        {"concurrency": 1, "generate_tokens_per_s": 120.0, "lmaas_tokens_per_s": 118.0, "ratio": 118 / 120},
        {"concurrency": 16, "generate_tokens_per_s": 120.0, "lmaas_tokens_per_s": 600.0, "ratio": 5.0}]}))
    (results / "compression.json").write_text(json.dumps({"at_scale": {"size": "base", "parameters": 88_000_000, "variants": [
        {"variant": "int8-dynamic", "latency_ms_per_token": 10.0, "parent_latency_ms_per_token": 30.0, "decode_speedup": 3.0}]}}))
    def levels(tokens_per_s: float, ttft: float) -> list[dict]:
        return [{"concurrency": c, "tokens_per_s": tokens_per_s * c, "ttft_p50_ms": ttft} for c in (16, 64)]

    (results / "serve_vllm.json").write_text(json.dumps({"closed_loop": {
        "vllm": levels(100.0, 50.0), "lmaas-vllm": levels(95.0, 55.0), "lmaas-engine": levels(50.0, 100.0),
        # the other standalone setting is faster at 64 streams and quicker to the first token at 16: each ratio takes the better
        "vllm-defaults": [{"concurrency": 16, "tokens_per_s": 1400.0, "ttft_p50_ms": 44.0}, {"concurrency": 64, "tokens_per_s": 8000.0, "ttft_p50_ms": 60.0}]}}))
    (results / "batch.json").write_text(json.dumps({"lines": 2000, "new_tokens": 64, "size": "small", "online": {"tokens_per_s": 100.0},
                                                    "engine": {"tokens_per_s": 200.0}, "batch": {"tokens_per_s": 150.0},
                                                    "ratios": {"batch_vs_online": 1.5, "batch_vs_engine": 0.75}}))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.START}\nold table\n{report.END}\noutro\n")

    report.main(results, readme)

    text = (results / "REPORT.md").read_text()
    assert "| data_ingest | tokenize + pack 1,000 tokens | 300 tok/s | 200 tok/s (one process) | 1.50x | > 1 on 2 cores | yes |" in text
    assert "| serve_embeddings | 32 clients: texts/s | 20.0 | 10.0 (encode, one at a time) | 2.00x | >= 3 | **no** |" in text
    assert "| engine_batching | 16 requests at once (12.9M params, no HTTP): output tokens/s | 600 | 120 (generate, one at a time) | 5.00x |" in text
    assert "| compression | int8-dynamic at size base (88M params, random weights): decode speed | 10.00 ms/token | 30.00 ms/token | 3.00x | >= 1.3 | yes |" in text
    assert "| serve_vllm | 16 streams, lmaas-vllm: output tokens/s | 1,520 | 1,600 (vllm serve alone, vllm) | 0.95x | >= 0.9 | yes |" in text
    assert "| serve_vllm | 64 streams, lmaas-vllm: output tokens/s | 6,080 | 8,000 (vllm serve alone, vllm-defaults) | 0.76x | >= 0.9 | **no** |" in text
    assert "| serve_vllm | 16 streams, lmaas-vllm: TTFT p50 | 55 ms | 44 ms (vllm serve alone, vllm-defaults) | 1.25x | <= 1.2 | **no** |" in text
    assert "| serve_vllm | 64 streams, lmaas-vllm: TTFT p50 | 55 ms | 50 ms (vllm serve alone, vllm) | 1.10x | <= 1.2 | yes |" in text
    assert "| serve_vllm | 16 streams, lmaas-engine: output tokens/s | 800 | 1,600 (vllm serve alone, vllm) | 0.50x | report |" in text
    assert "| batch | 2,000 completion lines x 64 tokens (small model), start to finish: output tokens/s | 150 | 100 (online API, 16 streams) | 1.50x | >= 1.2 | yes |" in text
    assert "| 150 | 200 (the engine alone, one process) | 0.75x | >= 0.8 | **no** |" in text
    assert "| train_throughput | not run |" in text and "![ratios](ratios.png)" in text
    assert (results / "ratios.png").stat().st_size > 1000
    refreshed = readme.read_text()
    assert "old table" not in refreshed and "| data_ingest |" in refreshed
    assert refreshed.startswith("intro\n") and refreshed.endswith("outro\n")
