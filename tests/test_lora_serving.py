"""LoRA adapters served per request on the vLLM engine: the adapter's log-probs are peft's on the same weights, the
base is untouched beside it, /v1/models lists both, and adapters that do not fit the base are refused at start."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from models.registry import ModelSpec
from serve.adapters import AdapterError, max_lora_rank, resolve_adapters
from tests.conftest import REPO, RunningServer, start, stop_server

PROMPT = "The capital of France is Paris, and the capital of Italy is"


def _adapter(spec: ModelSpec, out: Path, rank: int = 8) -> Path:
    """A peft LoRA on SmolLM2 with non-zero updates (fresh adapters start as the base exactly)."""
    from peft import LoraConfig, get_peft_model

    from distill.model_io import load_model

    model = get_peft_model(load_model(spec.checkpoint_dir), LoraConfig(r=rank, lora_alpha=2 * rank,
                                                                        target_modules="all-linear"))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def adapter(smollm2: ModelSpec, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _adapter(smollm2, tmp_path_factory.mktemp("lora") / "shouty")


def test_adapters_are_checked_against_the_base(smollm2, adapter, tmp_path):
    [a] = resolve_adapters(smollm2, (str(adapter),))
    assert (a.name, a.path, a.rank) == ("shouty", adapter, 8) and max_lora_rank((a,)) == 8
    # a post-training result: a model directory with adapter/ and a card naming the weights it started from
    run = tmp_path / "arith-lora"
    shutil.copytree(adapter, run / "adapter")
    from models.checkpoint import weights_state

    (run / "cascade-card.json").write_text(json.dumps({"start_weights": weights_state(smollm2.checkpoint_dir)}))
    [b] = resolve_adapters(smollm2, (f"math={run}",))
    assert (b.name, b.path) == ("math", run / "adapter")
    (run / "cascade-card.json").write_text(json.dumps({"start_weights": {"model.safetensors": [1, 2]}}))
    with pytest.raises(AdapterError, match="only fits the weights it was trained on"):
        resolve_adapters(smollm2, (str(run),))

    foreign = tmp_path / "foreign"
    shutil.copytree(adapter, foreign)
    config = json.loads((foreign / "adapter_config.json").read_text())
    (foreign / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": "gpt2"}))
    with pytest.raises(AdapterError, match="trained on gpt2, not on the served smollm2-135m-instruct"):
        resolve_adapters(smollm2, (str(foreign),))
    (foreign / "adapter_config.json").write_text(json.dumps(config | {"peft_type": "IA3"}))
    with pytest.raises(AdapterError, match="only LoRA is served"):
        resolve_adapters(smollm2, (str(foreign),))
    pickled = tmp_path / "pickled"
    shutil.copytree(adapter, pickled)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    with pytest.raises(AdapterError, match="--allow-pickle"):
        resolve_adapters(smollm2, (str(pickled),))
    with pytest.raises(AdapterError, match="already served"):
        resolve_adapters(smollm2, (f"smollm2-135m-instruct={adapter}",))
    with pytest.raises(AdapterError, match="already served"):
        resolve_adapters(smollm2, (str(adapter), str(adapter)))
    with pytest.raises(AdapterError, match="neither a directory nor a registered model"):
        resolve_adapters(smollm2, ("no-such-thing",))
    with pytest.raises(AdapterError, match="holds no LoRA adapter"):
        resolve_adapters(smollm2, (str(tmp_path),))


def test_llamacpp_refuses_adapters_before_loading_anything(adapter):
    run = subprocess.run([sys.executable, "-m", "serve", "--engine", "llamacpp", "--lora", str(adapter),
                          "--port", "8799"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "--lora serves adapters per request on the vllm engine" in run.stderr
    assert "Traceback" not in run.stderr


@pytest.fixture(scope="module")
def lora_server(smollm2: ModelSpec, adapter: Path, tmp_path_factory: pytest.TempPathFactory):
    s = start(smollm2, tmp_path_factory.mktemp("lora-server"), "--max-model-len", "512", "--lora", str(adapter),
              "--lora", f"again={adapter}", api_key="k")
    yield s
    stop_server(s)


def _prompt_logprobs(server: RunningServer, model: str) -> tuple[list[int], list[float]]:
    r = httpx.post(f"{server.base_url}/v1/completions", headers=server.headers, timeout=120, json={
        "model": model, "prompt": PROMPT, "max_tokens": 1, "echo": True, "logprobs": 0, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == model
    lp = body["choices"][0]["logprobs"]["token_logprobs"]
    return lp[1:-1], lp  # prompt tokens after the first (the generated one last)


def _peft_logprobs(smollm2: ModelSpec, adapter: Path | None) -> list[float]:
    from peft import PeftModel

    from distill.model_io import load_model
    from models.tokenizers import load_tokenizer

    ids = torch.tensor([load_tokenizer(smollm2).encode(PROMPT)])
    model = load_model(smollm2.checkpoint_dir).float()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
    return logp.gather(-1, ids[0, 1:, None])[:, 0].tolist()


def test_requests_name_the_adapter_or_the_base(lora_server, smollm2, adapter):
    from openai import NotFoundError, OpenAI

    models = httpx.get(f"{lora_server.base_url}/v1/models", headers=lora_server.headers).json()["data"]
    assert [(m["id"], m["parent"]) for m in models] == [(smollm2.name, None), ("shouty", smollm2.name),
                                                       ("again", smollm2.name)]
    assert all(str(adapter) not in json.dumps(m) for m in models)  # no paths leak

    with_adapter, _ = _prompt_logprobs(lora_server, "shouty")
    base, _ = _prompt_logprobs(lora_server, smollm2.name)
    want_adapter, want_base = _peft_logprobs(smollm2, adapter), _peft_logprobs(smollm2, None)
    off = lambda a, b: sum(abs(x - y) for x, y in zip(a, b, strict=True)) / len(a)  # noqa: E731
    assert off(with_adapter, want_adapter) < 2e-3  # the adapter computes what peft computes on the same weights
    assert off(base, want_base) < 2e-3  # and the base beside it is the base
    assert off(want_adapter, want_base) > 0.05  # (the adapter changes the model enough to tell them apart)
    assert off(_prompt_logprobs(lora_server, "again")[0], with_adapter) < 1e-4

    client = OpenAI(base_url=f"{lora_server.base_url}/v1", api_key="k")
    chat = client.chat.completions.create(model="shouty", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=4, temperature=0)
    assert chat.model == "shouty" and chat.choices[0].message.content
    with pytest.raises(NotFoundError, match="serves 'smollm2-135m-instruct', 'shouty', 'again'"):
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert httpx.get(f"{lora_server.base_url}/v1/models/shouty", headers=lora_server.headers).json()["parent"] == \
        smollm2.name
