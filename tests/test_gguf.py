"""GGUF export (models/gguf.py): llama.cpp computes the same model transformers does, each quantization writes the
tensor types it promises, and exports are cached until the weights change."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.gguf import export_gguf, gguf_dir
from models.registry import ModelSpec, get_model
from serve.engine import GenerationParams
from serve.llamacpp_engine import LlamaCppEngine, LlamaCppSettings
from tests.conftest import REPO


def llamacpp_generate(spec: ModelSpec, gguf: Path, prompt: list[int], n: int) -> list[tuple[int, float, dict]]:
    """(token id, logprob, {id: logprob of the top 5}) per generated token, greedy, through our llama.cpp engine."""
    engine = LlamaCppEngine(spec, LlamaCppSettings(gguf=gguf, max_model_len=2048, kv_cache_tokens=2048, parallel=1,
                                                   threads=2))

    async def run() -> list[tuple[int, float, dict]]:
        await engine.start()
        steps = []
        params = GenerationParams(max_tokens=n, temperature=0.0, logprobs=5, ignore_eos=True)
        async for out in engine.generate(prompt, params, "r"):
            for c in out.choices:
                steps += [(t.token_id, t.logprob, {i: lp for i, _, lp in t.top}) for t in c.logprobs or []]
        engine.shutdown()
        return steps

    return asyncio.run(run())


def transformers_steps(spec: ModelSpec, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(spec.checkpoint_dir, dtype=torch.float32).eval()
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         output_scores=True, return_dict_in_generate=True)
    ids = out.sequences[0, len(prompt):].tolist()
    return ids, torch.log_softmax(torch.stack(out.scores)[:, 0].float(), dim=-1)


@pytest.mark.parametrize(("name", "prompt_len"), [
    ("tiny-mistral", 300),  # within its 512-token sliding window (llama.cpp's llama architecture has none)
    ("tiny-ministral3", 700),  # past its YaRN original context (512): the rope scaling and query temperature act
])
def test_llamacpp_computes_what_transformers_computes(name: str, prompt_len: int) -> None:
    spec = get_model(name)
    prompt = [1] + [(37 * i) % 120000 + 1000 for i in range(prompt_len - 1)]
    gguf = export_gguf(spec, "f32", progress=False)
    steps = llamacpp_generate(spec, gguf, prompt, 8)
    ids, logprobs = transformers_steps(spec, prompt, 8)
    assert [s[0] for s in steps] == ids
    for k, (token, logprob, top) in enumerate(steps):
        assert logprob == pytest.approx(logprobs[k, token].item(), rel=1e-3, abs=2e-3)
        for alt, alt_lp in top.items():
            assert alt_lp == pytest.approx(logprobs[k, alt].item(), rel=1e-3, abs=2e-3)  # f32 on both sides


def test_smollm2_f16_answers_like_transformers(smollm2: ModelSpec) -> None:
    from models.tokenizers import load_tokenizer

    prompt = load_tokenizer(smollm2).encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    steps = llamacpp_generate(smollm2, export_gguf(smollm2, "f16", progress=False), prompt, 7)
    ids, _ = transformers_steps(smollm2, prompt, 7)
    assert [s[0] for s in steps] == ids  # "The capital of France is Paris."


@pytest.mark.parametrize(("quant", "embedding", "matrix"), [
    ("f32", "F32", "F32"), ("f16", "F16", "F16"), ("q8_0", "Q8_0", "Q8_0"), ("q4_1", "Q8_0", "Q4_1"),
])
def test_quantizations_write_the_promised_types(tiny_mistral: ModelSpec, quant: str, embedding: str,
                                                matrix: str) -> None:
    from gguf import GGUFReader

    reader = GGUFReader(export_gguf(tiny_mistral, quant, progress=False))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["token_embd.weight"] == embedding and types["blk.0.attn_q.weight"] == matrix
    assert types["blk.0.ffn_down.weight"] == matrix and types["output_norm.weight"] == "F32"
    fields = reader.fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["tokenizer.ggml.pre"].contents() == "tekken"
    assert len(fields["tokenizer.ggml.tokens"].data) == 131072


def test_export_is_cached_until_the_weights_change(tiny_mistral: ModelSpec, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    copy = tmp_path / "student"
    shutil.copytree(tiny_mistral.checkpoint_dir, copy)
    monkeypatch.setenv("CASCADE_HOME", str(tmp_path / "home"))
    spec = get_model(str(copy))
    first = export_gguf(spec, "q8_0", progress=False)
    assert first.parent == gguf_dir(spec, "q8_0") and str(tmp_path / "home") in str(first)
    made = first.stat().st_mtime_ns
    assert export_gguf(spec, "q8_0", progress=False).stat().st_mtime_ns == made  # reused
    weights = copy / "model.safetensors"
    os.utime(weights, ns=(made + 10**9, made + 10**9))  # the student was retrained
    assert export_gguf(spec, "q8_0", progress=False).stat().st_mtime_ns != made


def test_export_cli(tiny_mistral: ModelSpec) -> None:
    out = subprocess.run([sys.executable, "-m", "models", "export-gguf", "tiny-mistral", "--quant", "q4_1"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == gguf_dir(tiny_mistral, "q4_1") / "model.gguf"
    assert Path(out.stdout.strip()).is_file()
    bad = subprocess.run([sys.executable, "-m", "models", "export-gguf", "no-such-model"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "unknown model" in bad.stderr and "Traceback" not in bad.stderr
