"""The GPU planner: memory per GPU under FSDP2, the fewest GPUs, FLOPs and GPU-hours, checked by hand arithmetic,
against torchtitan's published throughput, and through the real-size recipe's `--dry-run`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from distill.plan import Architecture
from distill.resources import ClusterConfig, GiB, flops_per_token, memory_per_gpu, stage_needs

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "distill/recipes/ministral-3-cascade.yaml"
LLAMA_3_1_8B = Architecture(num_hidden_layers=32, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                            num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False)
SMALL_24B = Architecture(num_hidden_layers=40, hidden_size=5120, intermediate_size=32768, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=131072, tie_word_embeddings=False)


def test_sharded_states_and_teacher_shrink_with_gpus_the_rest_does_not() -> None:
    eight = memory_per_gpu(LLAMA_3_1_8B, SMALL_24B, 8, 1, 8192, True, 512)
    sixty_four = memory_per_gpu(LLAMA_3_1_8B, SMALL_24B, 64, 1, 8192, True, 512)
    assert eight["student states"] * GiB == pytest.approx(16 * LLAMA_3_1_8B.params / 8)  # fp32 w + g + AdamW m, v
    assert eight["teacher"] * GiB == pytest.approx(4 * SMALL_24B.params / 8)  # fp32, as load_model loads it
    assert sixty_four["student states"] == pytest.approx(eight["student states"] / 8)
    # gathered: the running and the prefetched layer and the root (head + final norm) of each model; an untied
    # embedding is its own unit, gathered only for its lookup and gradient
    root = [a.vocab_size * a.hidden_size + a.hidden_size for a in (LLAMA_3_1_8B, SMALL_24B)]
    assert eight["gathered units"] * GiB == pytest.approx(
        4 * (2 * LLAMA_3_1_8B.layer_params + root[0] + 2 * SMALL_24B.layer_params + root[1]))
    for unsharded in ("gathered units", "activations", "logits"):
        assert sixty_four[unsharded] == eight[unsharded]
    # activation checkpointing keeps one [tokens, hidden] bf16 input per layer instead of every layer's tensors
    off = memory_per_gpu(LLAMA_3_1_8B, None, 8, 1, 8192, False, 512)
    assert eight["activations"] * GiB < off["activations"] * GiB / 5
    assert "teacher" not in off  # a cached teacher holds no weights here
    # a bf16 teacher (train.teacher_dtype) halves its shards and its share of the gathered units
    bf16 = memory_per_gpu(LLAMA_3_1_8B, SMALL_24B, 8, 1, 8192, True, 512, teacher_bytes=2)
    assert bf16["teacher"] == pytest.approx(eight["teacher"] / 2)
    assert bf16["gathered units"] * GiB == pytest.approx(
        4 * (2 * LLAMA_3_1_8B.layer_params + root[0]) + 2 * (2 * SMALL_24B.layer_params + root[1]))
    assert bf16["student states"] == eight["student states"] and bf16["activations"] == eight["activations"]


def test_flops_match_torchtitans_published_mfu() -> None:
    """torchtitan measured 5,762 tokens/s per H100 for Llama 3.1 8B (FSDP, bf16, seq 8192) and calls it 33-39% MFU
    (benchmarks/llama3_h100_202412_torchtitan.md): our FLOPs count must put that throughput in the same band."""
    mfu = 5762 * flops_per_token(LLAMA_3_1_8B, 8192, train=True) / 989e12
    assert 0.30 < mfu < 0.40
    assert flops_per_token(LLAMA_3_1_8B, 1, train=False) == pytest.approx(2 * LLAMA_3_1_8B.params, rel=1e-4)


def test_fewest_gpus_and_gpu_hours() -> None:
    cluster = ClusterConfig(gpus=64)
    needs = stage_needs(LLAMA_3_1_8B, SMALL_24B, 10**12, 16384, 1, True, 512, cluster)
    assert needs.fits and needs.min_gpus == 4
    fewer = stage_needs(LLAMA_3_1_8B, SMALL_24B, 10**12, 16384, 1, True, 512, ClusterConfig(gpus=needs.min_gpus // 2))
    assert not fewer.fits
    # GPU-hours: (6N + attention + 2N recomputed, + the teacher's 2N + attention) per token at 35% of 989 TFLOPS
    per_token = (flops_per_token(LLAMA_3_1_8B, 16384, True) + 2 * LLAMA_3_1_8B.params
                 + flops_per_token(SMALL_24B, 16384, False))
    assert needs.gpu_hours == pytest.approx(10**12 * per_token / (989e12 * 0.35) / 3600)
    assert needs.teacher_gpu_hours / needs.gpu_hours == pytest.approx(
        flops_per_token(SMALL_24B, 16384, False) / per_token)
    # what serving the teacher apart frees here: its shards and its gathered units
    alone = memory_per_gpu(LLAMA_3_1_8B, None, 64, 1, 16384, True, 512)
    assert needs.teacher_gib == pytest.approx(needs.total_gib - sum(alone.values()))
    assert needs.teacher_gib > needs.memory["teacher"]
    no_ac = stage_needs(LLAMA_3_1_8B, SMALL_24B, 10**12, 16384, 1, False, 512, cluster)
    assert no_ac.min_gpus is None and not no_ac.fits  # 16k tokens of every layer's activations: no count helps


def _dry_run(recipe: Path, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "distill", "cascade", str(recipe), "--dry-run", *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_the_real_size_recipe_plans_ministral_3_shapes_and_their_gpus(tmp_path: Path) -> None:
    out = _dry_run(RECIPE)
    assert "parent mistral-small-24b: 40 layers, hidden 5120, FFN 32768, heads 32/8 x 128, vocab 131072: 23572.4M" \
        in out
    assert "stage 1 ministral-3-14b: 40 layers, hidden 5120, FFN 16384" in out and "13506.1M params" in out
    assert "stage 2 ministral-3-8b: 34 layers, hidden 4096, FFN 14336" in out and "8489.6M params" in out
    assert out.count("FSDP2 on 64 x H100 SXM 80GB") == 3 and "GPU-hours at 35% MFU of 989 TFLOPS" in out
    assert "teacher served apart" in out and "needs: at least 8 GPUs" in out
    # the recipe holds its 24B teacher in bf16: 0.7 GiB of shards per GPU of 64, not fp32's 1.4
    assert out.count("teacher 0.7)") == 3 and "its shards and gathered layers" in out
    four = _dry_run(RECIPE, "--gpus", "4")
    assert "FSDP2 on 4 x H100 SXM 80GB" in four and "DOES NOT FIT" in four
    # the same recipe without activation checkpointing: the planner says no GPU count helps, and why
    raw = yaml.safe_load(RECIPE.read_text())
    raw["train"]["activation_checkpointing"] = False
    (tmp_path / "no-ac.yaml").write_text(yaml.safe_dump(raw))
    assert "fits on no GPU count" in _dry_run(tmp_path / "no-ac.yaml")


def test_plans_without_a_cluster_print_no_gpu_lines() -> None:
    out = _dry_run(ROOT / "distill/recipes/smollm2-cascade.yaml")
    assert "FSDP2 on" not in out and "stage 2" in out
    assert "FSDP2 on 2 x H100" in _dry_run(ROOT / "distill/recipes/smollm2-cascade.yaml", "--gpus", "2")
