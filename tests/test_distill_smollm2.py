"""Smoke test on the real teacher: a two-stage cascade of SmolLM2-135M, then its student served by vLLM by name."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.cascade import load_recipe, run_recipe
from models.registry import ModelSpec, get_model
from tests.conftest import start, stop_server

pytestmark = [pytest.mark.slow, pytest.mark.server]


def test_tiny_cascade_on_smollm2_is_served_by_both_engines(smollm2: ModelSpec, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    parent = str(smollm2.checkpoint_dir)
    monkeypatch.setenv("CASCADE_HOME", str(tmp_path / "home"))  # students and the registry stay in the test
    recipe = {
        "name": "smoke", "parent": parent,
        "data": {"sources": [{"kind": "shakespeare"}], "seq_len": 64, "val_sequences": 4, "max_train_tokens": 20000},
        "calibration_sequences": 4,
        "train": {"batch_size": 2, "eval": {"every": 3}, "checkpoint": {"every": 3}, "optim": {"lr": 3e-4}},
        "stages": [
            {"name": "smoke-a", "target": {"dims": {"num_hidden_layers": 27, "intermediate_size": 1280}},
             "tokens": 64 * 2 * 3},
            # a hidden-size cut: PCA rotation, the tied head untied, and 9 heads no longer divide 512 (Mistral config)
            {"name": "smoke-b", "target": {"dims": {"hidden_size": 512}}, "tokens": 64 * 2 * 2},
        ],
    }
    path = tmp_path / "smoke.yaml"
    path.write_text(yaml.safe_dump(recipe))
    cards = run_recipe(load_recipe(path), progress=False)

    first, second = cards
    assert first["final"]["val_kl"] < first["pruned_only"]["val_kl"]  # distillation moves toward the teacher
    assert first["pruned_only"]["val_kl"] < 3.0  # pruning by importance keeps a usable model (random is ~10)
    assert second["architecture"]["tie_word_embeddings"] is False
    spec = get_model("smoke-b")
    assert spec.family == "mistral" and spec.chat_format == "hf"

    # the served student (vLLM) and transformers agree on its greedy continuation
    prompt = "To be, or not to be, that is"
    tok = AutoTokenizer.from_pretrained(spec.path)
    model = AutoModelForCausalLM.from_pretrained(spec.path, dtype=torch.float32).eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    expected = tok.decode(model.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1]:])
    # ... and so does llama.cpp on its GGUF export (f32: the same numbers; a Mistral config with head_dim 64)
    for engine, args in (("vllm", ("--enforce-eager",)), ("llamacpp", ("--gguf-quant", "f32"))):
        server = start(spec, tmp_path, "--max-model-len", "256", *args, engine=engine)
        try:
            r = httpx.post(f"{server.base_url}/v1/completions", timeout=120, json={
                "model": "smoke-b", "prompt": prompt, "max_tokens": 6, "temperature": 0})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == expected, engine
        finally:
            stop_server(server)
