"""The attention kernel inside transformers (kernels/hf.py): a tiny Mistral with a sliding window matches sdpa in
training (logits and gradients) and in generation with a KV cache (queries shorter than keys)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, MistralConfig, MistralForCausalLM

import kernels.hf
from tests.kernel_checks import DEVICE, fresh_seed

WINDOW = 24


@pytest.fixture
def model():
    kernels.hf.register()
    fresh_seed()
    config = MistralConfig(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=32, sliding_window=WINDOW,
                           max_position_embeddings=512, pad_token_id=0)
    return MistralForCausalLM(config).to(DEVICE)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Count the times transformers' attention went through our kernel (and not the SDPA fallback)."""
    calls = []
    real = kernels.hf.attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels.hf, "attention", counting)
    return calls


def _logits_and_grads(model, ids, implementation):
    model.set_attn_implementation(implementation)
    model.zero_grad()
    logits = model(ids).logits
    logits.float().logsumexp(-1).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_training_forward_and_backward_match_sdpa(model, kernel_calls):
    ids = torch.randint(1, 300, (2, 60), device=DEVICE)  # longer than the window
    model.train()
    ref, ref_grads = _logits_and_grads(model, ids, "sdpa")
    out, grads = _logits_and_grads(model, ids, "cascade")
    assert len(kernel_calls) == 2  # one per layer: the kernel ran, no fallback
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_generation_with_a_cache_matches_sdpa(model, kernel_calls):
    model.eval()
    ids = torch.randint(1, 300, (2, 30), device=DEVICE)
    results = {}
    for implementation in ("sdpa", "cascade"):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            cache = DynamicCache(config=model.config)
            prefix = model(ids[:, :20], past_key_values=cache, use_cache=True).logits
            chunk = model(ids[:, 20:], past_key_values=cache, use_cache=True).logits  # 10 queries, 30 keys
            generated = model.generate(ids[:, :12], max_new_tokens=20, do_sample=False,
                                       attention_mask=torch.ones_like(ids[:, :12]))
        results[implementation] = (prefix, chunk, generated)
    assert any(shape[1] == 1 for shape in kernel_calls)  # decode steps: one query token against the cache
    torch.testing.assert_close(results["cascade"][0], results["sdpa"][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(results["cascade"][1], results["sdpa"][1], rtol=1e-4, atol=1e-5)
    assert torch.equal(results["cascade"][2], results["sdpa"][2])


def test_padding_falls_back_to_sdpa_and_stays_right(model, kernel_calls):
    model.eval()
    ids = torch.randint(1, 300, (2, 16), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding in the second row: not a plain causal mask
    outs = {}
    for implementation in ("sdpa", "cascade"):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            outs[implementation] = model(ids, attention_mask=mask).logits
    assert not kernel_calls
    torch.testing.assert_close(outs["cascade"][mask.bool()], outs["sdpa"][mask.bool()])
