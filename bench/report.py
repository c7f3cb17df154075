"""Benchmark report: every `bench/results/*.json` in one table of ratios, with the machine and plots.

    python bench/report.py            # what `make bench` runs last

Writes `bench/results/REPORT.md` and `bench/results/ratios.png`, and replaces the table between
the `<!-- bench:start -->` / `<!-- bench:end -->` markers in README.md. A benchmark whose results
file is missing is listed as "not run"; each row says whether it meets the target the issues set.
"""

from __future__ import annotations

import json
import os
import platform
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


@dataclass
class Row:
    bench: str
    measure: str
    lmaas: str
    baseline: str
    ratio: float | None
    target: str
    met: bool | None


def _load(name: str, results: Path = RESULTS) -> dict | None:
    path = results / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _at(levels: list[dict], concurrency: int) -> dict:
    return next(level for level in levels if level["concurrency"] == concurrency)


def storage(d: dict) -> list[Row]:
    rows = []
    for backend, r in d["results"].items():
        rows.append(Row("storage", f"{backend}: publish (atomic + sha256) time", f"{r['lmaas_publish_s']:.3f} s",
                        f"{r['baseline_put_s']:.3f} s (fs.put)", r["publish_ratio"], "overhead, lower is better", None))
        rows.append(Row("storage", f"{backend}: download + verify time", f"{r['lmaas_download_s']:.3f} s",
                        f"{r['baseline_get_s']:.3f} s (fs.get)", r["download_ratio"], "overhead, lower is better", None))
    return rows


def data_ingest(d: dict) -> list[Row]:
    return [Row("data_ingest", f"tokenize + pack {d['tokens']:,} tokens", f"{d['ray_tokens_per_s']:,.0f} tok/s",
                f"{d['baseline_tokens_per_s']:,.0f} tok/s (one process)", d["ratio"], "> 1 on 2 cores", d["ratio"] > 1)]


def train_throughput(d: dict) -> list[Row]:
    rows = []
    for key in ("lmaas-1", "lmaas-2"):
        r = d[key]
        rows.append(Row("train_throughput", f"{d['model']} model, {r['workers']} worker(s), steady tokens/s",
                        f"{r['steady_tokens_per_s']:,.0f} tok/s", f"{d['baseline_tokens_per_s']:,.0f} tok/s (plain loop)",
                        r["ratio"], ">= 0.9", r["ratio"] >= 0.9))
    return rows


def serve_llm(d: dict) -> list[Row]:
    base, ours = d["baseline"], d["lmaas"]
    b16, l16 = _at(base, 16), _at(ours, 16)
    b1, l1 = _at(base, 1), _at(ours, 1)
    r16 = l16["tokens_per_s"] / b16["tokens_per_s"]
    latency = l1["itl_p50_ms"] / b1["itl_p50_ms"]
    return [
        Row("serve_llm", "16 streams: output tokens/s", f"{l16['tokens_per_s']:,.0f}", f"{b16['tokens_per_s']:,.0f} (generate, one at a time)",
            r16, ">= 4", r16 >= 4),
        Row("serve_llm", "1 stream: inter-token latency p50", f"{l1['itl_p50_ms']:.1f} ms", f"{b1['itl_p50_ms']:.1f} ms", latency,
            "<= 1.2 (latency)", latency <= 1.2),
    ]


def engine_batching(d: dict) -> list[Row]:
    top = max(d["levels"], key=lambda level: level["concurrency"])
    return [Row("engine_batching", f"{top['concurrency']} requests at once ({d['parameters'] / 1e6:.1f}M params, no HTTP): output tokens/s",
                f"{top['lmaas_tokens_per_s']:,.0f}", f"{top['generate_tokens_per_s']:,.0f} (generate, one at a time)",
                top["ratio"], ">= 4 (as serve_llm)", top["ratio"] >= 4)]


def serve_embeddings(d: dict) -> list[Row]:
    b, l = _at(d["baseline"], 32), _at(d["lmaas"], 32)
    ratio = l["texts_per_s"] / b["texts_per_s"]
    rows = [Row("serve_embeddings", "32 clients: texts/s", f"{l['texts_per_s']:,.1f}", f"{b['texts_per_s']:,.1f} (encode, one at a time)",
                ratio, ">= 3", ratio >= 3)]
    if d.get("lmaas_vllm"):  # the same gateway with `engine: vllm` (vLLM's pooling runner) vs lmaas's embedding engine
        for level in (8, 32):
            v, own = _at(d["lmaas_vllm"], level), _at(d["lmaas"], level)
            rows.append(Row("serve_embeddings", f"{level} clients, engine vllm: texts/s", f"{v['texts_per_s']:,.1f}",
                            f"{own['texts_per_s']:,.1f} (lmaas's embedding engine)", v["texts_per_s"] / own["texts_per_s"], "report", None))
    return rows


def compression(d: dict) -> list[Row]:
    rows = []
    for v in d.get("variants", []):
        name = v["variant"]
        if name == "int8-dynamic":
            rows.append(Row("compression", "int8-dynamic: size", "", "fp32 parent", v["size_ratio"], "<= 0.30", v["size_ratio"] <= 0.30))
            rows.append(Row("compression", "int8-dynamic: perplexity", f"{v['perplexity']:.2f}", f"{v['parent_perplexity']:.2f}",
                            1 + v["perplexity_increase"], "<= 1.02", v["perplexity_increase"] <= 0.02))
            rows.append(Row("compression", "int8-dynamic: decode speed", f"{v['latency_ms_per_token']:.2f} ms/token",
                            f"{v['parent_latency_ms_per_token']:.2f} ms/token", v["decode_speedup"], ">= 1.3", v["decode_speedup"] >= 1.3))
        elif name.startswith("prune") and "recovery_steps=0" not in name and "2:4" not in name:
            rows.append(Row("compression", f"{name}: perplexity", f"{v['perplexity']:.2f}", f"{v['parent_perplexity']:.2f}",
                            1 + v["perplexity_increase"], "<= 1.05", v["perplexity_increase"] <= 0.05))
    scale = d.get("at_scale")
    for v in (scale or {}).get("variants", []):
        if v["variant"] == "int8-dynamic":
            rows.append(Row("compression", f"int8-dynamic at size {scale['size']} ({scale['parameters'] / 1e6:.0f}M params, random weights): decode speed",
                            f"{v['latency_ms_per_token']:.2f} ms/token", f"{v['parent_latency_ms_per_token']:.2f} ms/token",
                            v["decode_speedup"], ">= 1.3", v["decode_speedup"] >= 1.3))
    medium = d.get("trained_medium")
    if medium:
        what = f"int8-dynamic on a trained {medium['parameters'] / 1e6:.0f}M-param parent ({medium['steps']} steps)"
        rows.append(Row("compression", f"{what}: size", "", "fp32 parent", medium["size_ratio"], "<= 0.30", medium["size_ratio"] <= 0.30))
        rows.append(Row("compression", f"{what}: perplexity", f"{medium['perplexity']:.2f}", f"{medium['parent_perplexity']:.2f}",
                        1 + medium["perplexity_increase"], "<= 1.02", medium["perplexity_increase"] <= 0.02))
        rows.append(Row("compression", f"{what}: decode speed", f"{medium['latency_ms_per_token']:.2f} ms/token",
                        f"{medium['parent_latency_ms_per_token']:.2f} ms/token", medium["decode_speedup"], ">= 1.3", medium["decode_speedup"] >= 1.3))
    distill = d.get("distill")
    if distill:
        rows.append(Row("compression", f"distilled student ({distill['parameter_ratio']:.2f}x the teacher's parameters): perplexity",
                        f"{distill['distilled_perplexity']:.2f}", f"{distill['scratch_perplexity']:.2f} (same student from scratch)",
                        distill["distilled_over_scratch"], "< 1", distill["distilled_over_scratch"] < 1))
    return rows


def serve_vllm(d: dict) -> list[Row]:
    rows = []
    loop = d["closed_loop"]
    standalone = [side for side in ("vllm", "vllm-defaults") if side in loop]  # results before vllm-defaults have one

    def best(level: int, key: str, pick: Callable) -> tuple[dict, str]:
        side = pick(standalone, key=lambda s: _at(loop[s], level)[key])
        return _at(loop[side], level), "vllm serve alone" + (f", {side}" if len(standalone) > 1 else "")

    sides = (("lmaas-vllm", 0.9), ("lmaas-vllm-deployment", None), ("lmaas-engine", None))
    for side, target in ((side, target) for side, target in sides if side in loop):  # results older than colocation lack the middle one
        for level in (16, 64):
            ours, (base, name) = _at(loop[side], level), best(level, "tokens_per_s", max)
            ratio = ours["tokens_per_s"] / base["tokens_per_s"]
            rows.append(Row("serve_vllm", f"{level} streams, {side}: output tokens/s", f"{ours['tokens_per_s']:,.0f}",
                            f"{base['tokens_per_s']:,.0f} ({name})", ratio,
                            f">= {target}" if target else "report", ratio >= target if target else None))
        for level in (16, 64):
            ours, (base, name) = _at(loop[side], level), best(level, "ttft_p50_ms", min)
            ttft = ours["ttft_p50_ms"] / base["ttft_p50_ms"]
            rows.append(Row("serve_vllm", f"{level} streams, {side}: TTFT p50", f"{ours['ttft_p50_ms']:.0f} ms",
                            f"{base['ttft_p50_ms']:.0f} ms ({name})", ttft, "<= 1.2" if target else "report", ttft <= 1.2 if target else None))
    return rows


def batch(d: dict) -> list[Row]:
    o, e, b, r = d["online"], d["engine"], d["batch"], d["ratios"]
    what = f"{d['lines']:,} completion lines x {d['new_tokens']} tokens ({d['size']} model), start to finish: output tokens/s"
    rows = [Row("batch", what, f"{b['tokens_per_s']:,.0f}", f"{o['tokens_per_s']:,.0f} (online API, 16 streams)", r["batch_vs_online"],
                ">= 1.2", r["batch_vs_online"] >= 1.2),
            Row("batch", what, f"{b['tokens_per_s']:,.0f}", f"{e['tokens_per_s']:,.0f} (the engine alone, one process)", r["batch_vs_engine"],
                ">= 0.8", r["batch_vs_engine"] >= 0.8)]
    if d.get("embeddings"):
        emb = d["embeddings"]
        ratio = emb["ratios"]["batch_vs_st"]
        rows.append(Row("batch", f"{emb['lines']:,} embedding lines (MiniLM), start to finish: texts/s", f"{emb['batch']['texts_per_s']:,.0f}",
                        f"{emb['sentence_transformers']['texts_per_s']:,.0f} (sentence-transformers encode, one process)", ratio, ">= 0.8",
                        ratio >= 0.8))
    return rows


def lora(d: dict) -> list[Row]:
    full, low = d["results"]["full"], d["results"]["lora"]
    ratio = d["ratios"]["tokens_per_s"]
    return [Row("lora", f"fine-tune {d['base_parameters'] / 1e6:.1f}M params on chat examples, 2 DDP workers: tokens/s",
                f"{low['tokens_per_s']:,.0f}", f"{full['tokens_per_s']:,.0f} (full fine-tuning)", ratio, ">= 1.3", ratio >= 1.3),
            Row("lora", "registered bytes: adapter / base", f"{low['registered_bytes'] / 1e6:,.2f} MB", f"{full['registered_bytes'] / 1e6:,.1f} MB",
                d["ratios"]["adapter_vs_base_bytes"], "report", None)]


BENCHES: dict[str, Callable[[dict], list[Row]]] = {
    "storage": storage,
    "data_ingest": data_ingest,
    "train_throughput": train_throughput,
    "serve_llm": serve_llm,
    "serve_vllm": serve_vllm,
    "serve_embeddings": serve_embeddings,
    "engine_batching": engine_batching,
    "compression": compression,
    "batch": batch,
    "lora": lora,
}


def collect(results: Path = RESULTS) -> tuple[list[Row], list[str]]:
    rows, missing = [], []
    for name, extract in BENCHES.items():
        data = _load(name, results)
        if data is None:
            missing.append(name)
            continue
        rows += extract(data)
    return rows, missing


def table(rows: list[Row], missing: list[str]) -> str:
    lines = ["| benchmark | measure | lmaas | baseline | ratio | target | met |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else ""
        met = "" if r.met is None else ("yes" if r.met else "**no**")
        lines.append(f"| {r.bench} | {r.measure} | {r.lmaas} | {r.baseline} | {ratio} | {r.target} | {met} |")
    for name in missing:
        lines.append(f"| {name} | not run | | | | | |")
    return "\n".join(lines)


def machine() -> str:
    import torch

    mem = ""
    try:
        kb = int(next(line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")).split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    load = ", load average %.1f" % os.getloadavg()[0] if hasattr(os, "getloadavg") else ""
    return f"{platform.machine()}, {os.cpu_count()} cores{mem}, {gpu}; Python {platform.python_version()}, torch {torch.__version__}{load}"


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r.ratio is not None and r.met is not None]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(shown) + 1.2))
    labels = [f"{r.bench}: {r.measure}"[:70] for r in shown]
    colors = ["#2a9d8f" if r.met else "#e76f51" for r in shown]
    ax.barh(range(len(shown)), [r.ratio for r in shown], color=colors)
    ax.set_yticks(range(len(shown)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("ratio lmaas / baseline (green: meets its target, red: misses)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(results: Path = RESULTS, readme: Path = ROOT / "README.md") -> None:
    rows, missing = collect(results)
    body = table(rows, missing)
    plots = sorted(p.name for p in results.glob("*.png") if p.name != "ratios.png")
    plot(rows, results / "ratios.png")
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    report = [
        "# lmaas benchmark report", "",
        f"Written by `bench/report.py` on {stamp}. Machine: {machine()}.", "",
        "Each benchmark runs lmaas and its baseline side by side in one run; ratios are lmaas / baseline",
        "(for times and perplexity, lower is better: the target column says which way). Details and caveats:",
        "README.md, section Benchmarks; raw numbers: the JSON files beside this one.", "",
        body, "",
        "![ratios](ratios.png)", "",
        *[f"![{name}]({name})" for name in plots],
    ]
    (results / "REPORT.md").write_text("\n".join(report) + "\n")
    text = readme.read_text()
    if START in text and END in text:
        block = f"{START}\n{body}\n\n(`bench/results/REPORT.md`, {stamp}; {machine()})\n{END}"
        readme.write_text(re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _m: block, text, flags=re.S))
    print(body)
    met = [r.met for r in rows if r.met is not None]
    print(f"\n{sum(met)} of {len(met)} targets met; report: {results / 'REPORT.md'}")


if __name__ == "__main__":
    main()
