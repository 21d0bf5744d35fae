"""Kernel benchmarks -> docs/bench/kernels.md (+ .json, + a PNG): `make bench-kernels`.

Everywhere: peak memory and time of the distillation loss at Mistral's 131,072-token vocabulary, three ways (the
naive loss on full logits, the trainer's chunked + checkpointed loss, the fused linear loss), each measured in a
fresh process; and the error of every kernel against float64 (under the interpreter on CPU).
On a CUDA GPU also: attention forward and forward+backward TFLOP/s against SDPA's flash backend, paged decode
bandwidth against the HBM peak, and the fused loss's Triton kernel.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
HBM_TBPS = {"H100": 3.35, "H200": 4.8, "A100": 2.0}  # nominal peaks, for "% of HBM"


# ---------------------------------------------------------------------------------------------------------------
# KD loss memory: one variant per process, so peaks do not mix


def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_loss(variant: str, tokens: int, hidden: int, vocab: int, chunk: int, device: str) -> dict:
    """Forward + backward of one loss variant; peak memory above what the inputs hold."""
    from torch.utils.checkpoint import checkpoint

    from kernels.distill_loss import FusedLossConfig, distill_loss_reference, fused_linear_distill_loss

    gen = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(tokens, hidden, device=device, generator=gen)
    w = torch.randn(vocab, hidden, device=device, generator=gen) * hidden**-0.5
    th = torch.randn(tokens, hidden, device=device, generator=gen)
    tw = torch.randn(vocab, hidden, device=device, generator=gen) * hidden**-0.5
    labels = torch.randint(0, vocab, (tokens,), device=device, generator=gen)
    h.requires_grad_()
    w.requires_grad_()

    def run() -> float:
        h.grad = w.grad = None
        if variant == "naive":
            loss = distill_loss_reference(h @ w.T, th @ tw.T, labels, FusedLossConfig())
        elif variant == "chunked":  # the algorithm of distill/losses.py's unfused path (kernels import no distill)
            def part(hs: torch.Tensor, ts: torch.Tensor, ls: torch.Tensor) -> torch.Tensor:
                with torch.no_grad():
                    teacher = ts @ tw.T
                return distill_loss_reference(hs @ w.T, teacher, ls, FusedLossConfig()) * len(ls)

            loss = sum(checkpoint(part, h[i:i + chunk], th[i:i + chunk], labels[i:i + chunk], use_reentrant=False)
                       for i in range(0, tokens, chunk)) / tokens
        else:
            backend = "triton" if variant == "fused-triton" else "torch"
            loss, _, _ = fused_linear_distill_loss(h, w, labels, FusedLossConfig(chunk_tokens=chunk),
                                                   teacher_hidden=th, teacher_head=tw, backend=backend)
        loss.backward()
        return loss.item()

    run()  # warm-up: allocator pools, kernel compilation
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak RSS (VmHWM) to the current RSS
        base = _rss_mib("VmRSS")
    start = time.perf_counter()
    loss = run()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device == "cuda" else _rss_mib("VmHWM") - base
    return {"variant": variant, "tokens": tokens, "hidden": hidden, "vocab": vocab, "chunk": chunk,
            "peak_mib": round(peak, 1), "seconds": round(seconds, 3), "loss": loss}


def loss_table(tokens_list: list[int], hidden: int, vocab: int, chunk: int, device: str) -> list[dict]:
    variants = ["naive", "chunked", "fused"] + (["fused-triton"] if device == "cuda" else [])
    rows = []
    for tokens in tokens_list:
        for variant in variants:
            cmd = [sys.executable, "-m", "kernels.bench", "--measure", variant, "--tokens", str(tokens),
                   "--hidden", str(hidden), "--vocab", str(vocab), "--chunk", str(chunk), "--device", device]
            env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
            # a fixed mmap threshold: glibc otherwise raises it after the first large free and keeps freed tensors
            # resident in its heap, so the warm-up run's memory would hide the measured run's peak
            env["MALLOC_MMAP_THRESHOLD_"] = "131072"
            done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
            if done.returncode:
                raise RuntimeError(f"{variant} at {tokens} tokens failed:\n{done.stderr[-2000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"  {variant:>12} {tokens:>6} tokens: {rows[-1]['peak_mib']:>9.1f} MiB  "
                  f"{rows[-1]['seconds']:.2f} s", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Correctness against float64 (the interpreter on CPU)


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def correctness_table(device: str) -> list[dict]:
    from kernels.attention import attention, attention_reference
    from kernels.decode import paged_decode_attention, paged_decode_reference
    from kernels.distill_loss import FusedLossConfig, distill_loss_reference, fused_linear_distill_loss
    from kernels.rmsnorm import rmsnorm, rmsnorm_reference
    from kernels.rotary import rotary, rotary_reference
    from kernels.swiglu import swiglu, swiglu_reference

    torch.manual_seed(0)
    rows = []
    for dtype in (torch.float32, torch.float16):
        q = torch.randn(2, 100, 8, 64, device=device, dtype=dtype)
        k = torch.randn(2, 100, 2, 64, device=device, dtype=dtype)
        v = torch.randn(2, 100, 2, 64, device=device, dtype=dtype)
        exact = attention_reference(q, k, v, window=40, compute_dtype=torch.float64)
        rows.append(("attention forward (GQA 4, window 40, seq 100, d 64)", dtype,
                     _err(attention(q, k, v, window=40), exact), _err(attention_reference(q, k, v, window=40), exact)))
        grad = torch.randn_like(q)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        attention(*leaves, window=40).backward(grad)
        ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
        attention_reference(*ref_leaves, window=40).backward(grad.double())
        low_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        attention_reference(*low_leaves, window=40).backward(grad)
        for name, a, b, c in zip("qkv", leaves, ref_leaves, low_leaves, strict=True):
            rows.append((f"attention backward d{name}", dtype, _err(a.grad, b.grad), _err(c.grad, b.grad)))

        blocks = torch.randn(64, 16, 2, 64, device=device, dtype=dtype)
        v_blocks = torch.randn(64, 16, 2, 64, device=device, dtype=dtype)
        table = torch.randperm(64, device=device)[:48].view(3, 16).to(torch.int32)
        lens = torch.tensor([1, 100, 250], device=device, dtype=torch.int32)
        qd = torch.randn(3, 8, 64, device=device, dtype=dtype)
        exact = paged_decode_reference(qd, blocks, v_blocks, table, lens, compute_dtype=torch.float64)
        rows.append(("paged decode (GQA 4, block 16, lens 1/100/250)", dtype,
                     _err(paged_decode_attention(qd, blocks, v_blocks, table, lens), exact),
                     _err(paged_decode_reference(qd, blocks, v_blocks, table, lens), exact)))

        x = torch.randn(64, 576, device=device, dtype=dtype)
        wn = torch.rand(576, device=device, dtype=dtype) + 0.5
        exact = rmsnorm_reference(x, wn, compute_dtype=torch.float64)
        rows.append(("rmsnorm forward (64 x 576)", dtype, _err(rmsnorm(x, wn), exact),
                     _err(rmsnorm_reference(x, wn).to(dtype), exact)))
        g, u = torch.randn(64, 1536, device=device, dtype=dtype), torch.randn(64, 1536, device=device, dtype=dtype)
        exact = swiglu_reference(g, u, torch.float64)
        rows.append(("swiglu forward (64 x 1536)", dtype, _err(swiglu(g, u), exact),
                     _err(swiglu_reference(g, u).to(dtype), exact)))
        angles = torch.rand(100, 32, device=device) * 100
        xr = torch.randn(100, 8, 64, device=device, dtype=dtype)
        exact = rotary_reference(xr, angles.cos(), angles.sin(), torch.float64)
        rows.append(("rotary (100 tokens, 8 heads, d 64)", dtype, _err(rotary(xr, angles.cos(), angles.sin()), exact),
                     _err(rotary_reference(xr, angles.cos(), angles.sin()).to(dtype), exact)))

    h = torch.randn(64, 64, device=device, requires_grad=True)
    w = (torch.randn(4099, 64, device=device) * 0.2).requires_grad_()
    t = torch.randn(64, 4099, device=device)
    labels = torch.randint(0, 4099, (64,), device=device)
    cfg = FusedLossConfig("jsd", temperature=2.0, beta=0.5, ce_weight=0.5, chunk_tokens=32)
    loss, _, _ = fused_linear_distill_loss(h, w, labels, cfg, teacher_logits=t, backend="triton")
    loss.backward()
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    exact = distill_loss_reference(h64 @ w64.T, t.double(), labels, cfg)
    exact.backward()
    rows.append(("fused KD loss (JSD + CE, vocab 4099): loss", torch.float32, _err(loss, exact), float("nan")))
    rows.append(("fused KD loss: d hidden", torch.float32, _err(h.grad, h64.grad), float("nan")))
    rows.append(("fused KD loss: d head", torch.float32, _err(w.grad, w64.grad), float("nan")))
    return [{"kernel": name, "dtype": str(dtype).removeprefix("torch."), "max_err": err, "torch_err": base}
            for name, dtype, err, base in rows]


# ---------------------------------------------------------------------------------------------------------------
# GPU only: speed


def _bench_ms(fn, reps: int = 20) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, rep=reps * 10))


def attention_speed() -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from kernels.attention import attention

    rows = []
    for head_dim in (64, 128):
        heads = 2048 // head_dim
        for causal in (False, True):
            for seq in (1024, 2048, 4096, 8192, 16384):
                batch = max(1, 16384 // seq)
                q, k, v = (torch.randn(batch, seq, heads, head_dim, device="cuda", dtype=torch.bfloat16,
                                       requires_grad=True) for _ in range(3))
                flops = 4 * batch * heads * seq * seq * head_dim * (0.5 if causal else 1.0)
                do = torch.randn_like(q)

                def ours(q=q, k=k, v=v, causal=causal):
                    return attention(q, k, v, causal=causal)

                def sdpa(q=q, k=k, v=v, causal=causal):
                    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                        return torch.nn.functional.scaled_dot_product_attention(
                            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal).transpose(1, 2)

                row = {"head_dim": head_dim, "causal": causal, "seq": seq, "batch": batch, "heads": heads}
                for name, fn in (("cascade", ours), ("sdpa_flash", sdpa)):
                    fwd = _bench_ms(fn)
                    both = _bench_ms(lambda fn=fn, do=do: fn().backward(do))
                    row[f"{name}_fwd_tflops"] = round(flops / fwd / 1e9, 1)
                    row[f"{name}_fwdbwd_tflops"] = round(3.5 * flops / both / 1e9, 1)
                rows.append(row)
                print(f"  attention d{head_dim} {'causal' if causal else 'full'} {seq}: {row}", flush=True)
    return rows


def decode_speed(peak_tbps: float | None) -> list[dict]:
    from kernels.decode import paged_decode_attention

    rows = []
    heads, kv_heads, dim, block = 32, 8, 128, 16
    for batch, context in ((1, 4096), (32, 4096), (64, 8192), (128, 4096)):
        blocks_per_seq = context // block
        num_blocks = batch * blocks_per_seq
        k_cache = torch.randn(num_blocks, block, kv_heads, dim, device="cuda", dtype=torch.bfloat16)
        v_cache = torch.randn_like(k_cache)
        table = torch.randperm(num_blocks, device="cuda", dtype=torch.int32).view(batch, blocks_per_seq)
        lens = torch.full((batch,), context, device="cuda", dtype=torch.int32)
        q = torch.randn(batch, heads, dim, device="cuda", dtype=torch.bfloat16)
        ms = _bench_ms(lambda q=q, k=k_cache, v=v_cache, t=table, n=lens: paged_decode_attention(q, k, v, t, n))
        gbps = 2 * k_cache.numel() * 2 / ms / 1e6
        rows.append({"batch": batch, "context": context, "ms": round(ms, 4), "GB/s": round(gbps, 1),
                     "pct_hbm": round(100 * gbps / (peak_tbps * 1000), 1) if peak_tbps else None})
        print(f"  decode {rows[-1]}", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Report


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    tokens = sorted({r["tokens"] for r in rows})
    width = 0.8 / len(variants)
    for i, variant in enumerate(variants):
        values = [next(r["peak_mib"] for r in rows if r["variant"] == variant and r["tokens"] == t) / 1024
                  for t in tokens]
        ax.bar([j + i * width for j in range(len(tokens))], values, width, label=variant)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tokens))], [f"{t} tokens" for t in tokens])
    ax.set_ylabel("peak memory above inputs (GiB)")
    ax.set_title(f"KD loss forward + backward, vocab {rows[0]['vocab']:,}, hidden {rows[0]['hidden']}")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(path)


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), no GPU"


def _summary(results: dict) -> list[str]:
    """The verdict on the fused loss's targets, read off the largest token count measured."""
    most = max(r["tokens"] for r in results["loss"])
    row = {r["variant"]: r for r in results["loss"] if r["tokens"] == most}
    fused = row.get("fused-triton", row["fused"])
    memory = fused["peak_mib"] / row["naive"]["peak_mib"]
    speed = row["naive"]["seconds"] / fused["seconds"]
    return ["## Summary", "",
            f"- Fused KD loss ({fused['variant']}) at {most} tokens x {fused['vocab']:,} vocab: peak memory "
            f"**{memory:.2f}x** the naive loss ({fused['peak_mib']:.0f} vs {row['naive']['peak_mib']:.0f} MiB; "
            f"target <= 0.25x: {'met' if memory <= 0.25 else 'NOT met'}), **{speed:.2f}x** its speed (target >= "
            f"1x: {'met' if speed >= 1 else 'NOT met'}); {row['chunked']['seconds'] / fused['seconds']:.2f}x the "
            f"speed of the chunked, checkpointed loss the trainer used before.",
            "- Every kernel's error is within 2x of plain torch in the same precision (table below; the test suite "
            "checks this over many more shapes)." if all(
                r["torch_err"] != r["torch_err"] or r["max_err"] <= 2 * r["torch_err"] + 1e-5
                for r in results["correctness"]) else "- Some kernel errors exceed 2x torch's: see the table.",
            "- GPU speed (attention TFLOP/s, decode bandwidth): " + (
                "measured below." if results.get("attention") else "not measured, no GPU in this run.")]


def write_report(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Kernel benchmarks", "",
        f"Written by `make bench-kernels` (`kernels/bench.py`) on {results['date']}. Device: **{results['device']}**."
        f" torch {results['torch']}, triton {results['triton']}.", "",
        *_summary(results), "",
        "## Distillation loss at vocab 131,072: peak memory and time (forward + backward)", "",
        "Student hidden states, student head, teacher hidden states and head in; loss, d hidden and d head out "
        "(forward KL, fp32). Each variant runs in its own process after a warm-up run; peak = "
        + ("`torch.cuda.max_memory_allocated` above the inputs." if results["device_type"] == "cuda" else
           "peak RSS (VmHWM, reset through `/proc/self/clear_refs`) above the RSS holding the inputs."), "",
        "- **naive**: full `[tokens x vocab]` student and teacher logits, log-softmaxes, autograd.",
        "- **chunked**: the algorithm of `distill/losses.py`'s unfused path (the trainer's loss before this kernel): "
        "chunks of tokens under activation checkpointing (logits recomputed in the backward).",
        "- **fused**: `kernels/distill_loss.py`: gradients made in the forward chunk by chunk, nothing recomputed "
        "(torch rows on CPU" + (", Triton rows as fused-triton" if results["device_type"] == "cuda" else "") + ").",
        "", "| tokens | variant | chunk | peak MiB | vs naive | seconds | vs naive | loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["loss"]:
        naive = next(x for x in results["loss"] if x["variant"] == "naive" and x["tokens"] == r["tokens"])
        lines.append(f"| {r['tokens']} | {r['variant']} | {r['chunk'] if r['variant'] != 'naive' else '-'} | "
                     f"{r['peak_mib']:.0f} | {r['peak_mib'] / naive['peak_mib']:.2f}x | {r['seconds']:.2f} | "
                     f"{r['seconds'] / naive['seconds']:.2f}x | {r['loss']:.6f} |")
    lines += ["", "![KD loss memory](kernels-kd-memory.png)", ""]
    lines += ["## Correctness against float64", "",
              "Max abs error of the kernel and of plain torch in the same precision (FlashAttention's rule: the "
              "kernel's must be at most 2x torch's; the tests enforce it over many more shapes)."
              + (" Run under `TRITON_INTERPRET=1`, so this checks the kernels' arithmetic, not GPU code generation."
                 if results["device_type"] != "cuda" else ""), "",
              "| kernel | dtype | kernel error | torch error |", "|---|---|---|---|"]
    for r in results["correctness"]:
        base = "-" if r["torch_err"] != r["torch_err"] else f"{r['torch_err']:.2e}"
        lines.append(f"| {r['kernel']} | {r['dtype']} | {r['max_err']:.2e} | {base} |")
    lines += ["", "## GPU speed", ""]
    if results.get("attention"):
        lines += ["Attention, bf16, batch x seq = 16k tokens, hidden 2048. TFLOP/s with 4·B·H·S²·D (x0.5 causal; "
                  "forward + backward counts 3.5x the forward's FLOPs).", "",
                  "| d | causal | seq | cascade fwd | SDPA flash fwd | cascade fwd+bwd | SDPA flash fwd+bwd |",
                  "|---|---|---|---|---|---|---|"]
        for r in results["attention"]:
            lines.append(f"| {r['head_dim']} | {r['causal']} | {r['seq']} | {r['cascade_fwd_tflops']} | "
                         f"{r['sdpa_flash_fwd_tflops']} | {r['cascade_fwdbwd_tflops']} | "
                         f"{r['sdpa_flash_fwdbwd_tflops']} |")
        lines += ["", "Paged decode, bf16, 32 query / 8 KV heads, d 128, block 16 (bytes = K + V read).", "",
                  "| batch | context | ms | GB/s | % of HBM peak |", "|---|---|---|---|---|"]
        for r in results["decode"]:
            lines.append(f"| {r['batch']} | {r['context']} | {r['ms']} | {r['GB/s']} | {r['pct_hbm']} |")
    else:
        lines += ["Not measured: this run had no GPU. The attention TFLOP/s against SDPA-flash, decode bandwidth "
                  "against HBM and the fused loss's Triton kernel speed are measured by this same script on a "
                  "CUDA machine (`make bench-kernels DEVICE=cuda`); targets on H100: attention forward >= SDPA "
                  "flash, backward >= 0.8x, decode >= 70% of HBM bandwidth, fused loss peak <= 1/4 of naive at "
                  "equal or better speed."]
    (out / "kernels.md.tmp").write_text("\n".join(lines) + "\n")
    (out / "kernels.md.tmp").replace(out / "kernels.md")
    (out / "kernels.json.tmp").write_text(json.dumps(results, indent=1))
    (out / "kernels.json.tmp").replace(out / "kernels.json")
    _plot(results["loss"], out / "kernels-kd-memory.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "bench")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=131072)
    parser.add_argument("--chunk", type=int, default=512, help="tokens per chunk (the trainer's default)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one loss variant in this process
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure_loss(args.measure, args.tokens[0], args.hidden, args.vocab, args.chunk,
                                      args.device)))
        return 0
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        # kernels must be imported under the interpreter: re-run this process with it set
        return subprocess.call([sys.executable, "-m", "kernels.bench", *(argv or sys.argv[1:])], cwd=REPO,
                               env={**os.environ, "TRITON_INTERPRET": "1"})
    import triton

    print(f"KD loss at vocab {args.vocab:,}, hidden {args.hidden}, chunk {args.chunk}:", flush=True)
    results: dict = {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "device": _device_name(args.device),
                     "device_type": args.device, "torch": torch.__version__, "triton": triton.__version__,
                     "loss": loss_table(args.tokens, args.hidden, args.vocab, args.chunk, args.device)}
    print("correctness against float64:", flush=True)
    results["correctness"] = correctness_table(args.device)
    if args.device == "cuda":
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in HBM_TBPS.items() if k in name), None)
        results["attention"] = attention_speed()
        results["decode"] = decode_speed(peak)
    write_report(results, args.out)
    print(f"wrote {args.out / 'kernels.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
