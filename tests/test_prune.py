"""Pruning maths on random micro models: each cut equals the function it claims to compute."""

from __future__ import annotations

import pytest
import torch

from distill.calibrate import collect_importance
from distill.model_io import model_from_state, plain_state
from distill.plan import Architecture, PlanError, plan_architecture, prune_to
from distill.prune import as_mistral, drop_layers, heads_to_keep, pca_rotation, rotate_hidden, slice_ffn, slice_heads
from tests.distill_micro import logits, micro_model

FP32_NORM = dict(rtol=1e-5, atol=5e-5)  # HF RMSNorm computes in fp32 even for float64 models
IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))


def _stats(model):
    return collect_importance(model, IDS[None], progress=False)


def _rebuild(config, state):
    return model_from_state(config, state, dtype=torch.float64).eval()


@pytest.mark.parametrize("kind,tied", [("llama", False), ("llama", True), ("mistral", False)])
def test_identity_target_reproduces_parent(kind, tied):
    model = micro_model(kind, tied)
    config, state = prune_to(model.config, plain_state(model), _stats(model), Architecture.of(model.config))
    child = _rebuild(config, state)
    assert torch.equal(logits(child, IDS), logits(model, IDS))


def test_dropping_a_layer_equals_skipping_it():
    model = micro_model("mistral")
    config, state = drop_layers(model.config, plain_state(model), [0, 1, 3])
    child = _rebuild(config, state)
    assert child.config.num_hidden_layers == 3
    hook = model.model.layers[2].register_forward_hook(lambda mod, args, out: args[0])  # layer 2 -> identity
    try:
        expected = logits(model, IDS)
    finally:
        hook.remove()
    torch.testing.assert_close(logits(child, IDS), expected, rtol=0, atol=1e-12)
    assert not torch.allclose(logits(model, IDS), expected)  # the skipped layer did matter


def test_slicing_ffn_equals_zeroing_the_dropped_channels():
    model = micro_model()
    keep = [torch.randperm(128, generator=torch.Generator().manual_seed(i))[:40] for i in range(4)]
    config, state = slice_ffn(model.config, plain_state(model), keep)
    child = _rebuild(config, state)
    with torch.no_grad():
        for i, idx in enumerate(keep):
            mask = torch.zeros(128, dtype=torch.bool)
            mask[idx] = True
            model.model.layers[i].mlp.down_proj.weight[:, ~mask] = 0
    torch.testing.assert_close(logits(child, IDS), logits(model, IDS), rtol=0, atol=1e-10)


def test_slicing_heads_is_group_consistent_and_equals_zeroing_them():
    model = micro_model(num_attention_heads=8, num_key_value_heads=2, head_dim=8)
    scores = torch.rand(4, 8, dtype=torch.float64)
    keep = heads_to_keep(scores, model.config, num_heads=2, num_kv_heads=1)
    config, state = slice_heads(model.config, plain_state(model), keep)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (2, 1, 8)
    child = _rebuild(config, state)
    with torch.no_grad():
        for i, heads in enumerate(keep):
            assert len(set((heads // 4).tolist())) == 1  # both kept heads read the one kept KV group
            mask = torch.zeros(8, dtype=torch.bool)
            mask[heads] = True
            model.model.layers[i].self_attn.o_proj.weight.view(64, 8, 8)[:, ~mask] = 0
    torch.testing.assert_close(logits(child, IDS), logits(model, IDS), rtol=0, atol=1e-10)


def test_uneven_heads_per_group_are_refused():
    model = micro_model()
    with pytest.raises(ValueError, match="uneven"):
        slice_heads(model.config, plain_state(model), [torch.tensor([0, 1, 2])] * 4)


@pytest.mark.parametrize("kind,tied,untie", [("llama", False, False), ("llama", True, True), ("mistral", False, False)])
def test_full_rank_rotation_reproduces_logits(kind, tied, untie):
    model = micro_model(kind, tied)
    rotation = pca_rotation(_stats(model)["hidden_second_moment"], 64)
    config, state = rotate_hidden(model.config, plain_state(model), rotation, untie=untie)
    child = _rebuild(config, state)
    assert not any(torch.equal(state[k], plain_state(model)[k]) for k in state if k.endswith("q_proj.weight"))
    torch.testing.assert_close(logits(child, IDS), logits(model, IDS), **FP32_NORM)


def test_llama_becomes_mistral_when_heads_no_longer_divide_the_hidden_size():
    model = micro_model(tied=True, num_attention_heads=6, num_key_value_heads=3, head_dim=16, hidden_size=96)
    same = model_from_state(as_mistral(model.config), plain_state(model), dtype=torch.float64).eval()
    assert type(same).__name__ == "MistralForCausalLM" and same.config.sliding_window is None
    assert torch.equal(logits(same, IDS), logits(model, IDS))
    rotation = pca_rotation(_stats(model)["hidden_second_moment"], 64)  # 64 % 6 != 0
    config, state = rotate_hidden(model.config, plain_state(model), rotation)
    assert config.model_type == "mistral" and config.head_dim == 16 and config.hidden_size == 64
    assert torch.isfinite(logits(_rebuild(config, state), IDS)).all()


def test_tied_rotation_is_exact_when_the_final_gain_is_uniform():
    model = micro_model(tied=True)
    with torch.no_grad():
        model.model.norm.weight.fill_(1.3)
    rotation = pca_rotation(_stats(model)["hidden_second_moment"], 64)
    config, state = rotate_hidden(model.config, plain_state(model), rotation)
    assert config.tie_word_embeddings and "lm_head.weight" not in state
    torch.testing.assert_close(logits(_rebuild(config, state), IDS), logits(model, IDS), **FP32_NORM)


def test_pca_keeps_most_of_the_function_and_beats_a_random_rotation():
    model = micro_model()
    stats = _stats(model)
    reference = torch.log_softmax(logits(model, IDS), -1)

    def kl(rotation):
        config, state = rotate_hidden(model.config, plain_state(model), rotation)
        child = torch.log_softmax(logits(_rebuild(config, state), IDS), -1)
        return (reference.exp() * (reference - child)).sum(-1).mean().item()

    random_q = torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))[0]
    assert kl(pca_rotation(stats["hidden_second_moment"], 48)) < kl(random_q[:, :48])


def test_pruned_child_loads_and_has_the_planned_parameter_count():
    model = micro_model("mistral", tied=True)
    parent = Architecture.of(model.config)
    target = plan_architecture(parent, dims={"num_hidden_layers": 3, "hidden_size": 48},
                               params=int(parent.params * 0.6))
    assert target.intermediate_size < 128 and not target.tie_word_embeddings  # the head was untied, and counted
    config, state = prune_to(model.config, plain_state(model), _stats(model), target)
    child = _rebuild(config, state)
    assert Architecture.of(child.config) == target
    assert sum(p.numel() for p in child.parameters()) == target.params
    assert target.params <= parent.params * 0.6
    assert torch.isfinite(logits(child, IDS)).all()


def test_approximate_tie_keeps_a_tied_child():
    model = micro_model(tied=True)
    parent = Architecture.of(model.config)
    target = plan_architecture(parent, dims={"hidden_size": 48}, tied="approximate")
    config, state = prune_to(model.config, plain_state(model), _stats(model), target)
    child = _rebuild(config, state)
    assert child.config.tie_word_embeddings and sum(p.numel() for p in child.parameters()) == target.params


def test_planner_errors_name_the_problem():
    parent = Architecture.of(micro_model().config)
    with pytest.raises(PlanError, match="not below"):
        plan_architecture(parent, params=parent.params + 1)
    with pytest.raises(PlanError, match="smallest child"):
        plan_architecture(parent, params=1000)
    with pytest.raises(PlanError, match="vocab_size"):
        plan_architecture(parent, dims={"vocab_size": 100})
    with pytest.raises(PlanError, match="between 1 and"):
        plan_architecture(parent, dims={"hidden_size": 4096})


def test_calibration_statistics_see_an_identity_block():
    model = micro_model()
    with torch.no_grad():  # block 1 writes nothing to the residual stream
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    stats = _stats(model)
    assert stats["block_importance"][1].abs() < 1e-12 and abs(stats["layer_norm_ratio"][1] - 1) < 1e-12
    assert (stats["block_importance"][[0, 2, 3]] > 1e-3).all()
    assert stats["ffn_mean_abs"].shape == (4, 128) and stats["head_norm"].shape == (4, 4)
    assert int(stats["tokens"]) == IDS.numel()
    assert torch.allclose(stats["hidden_second_moment"], stats["hidden_second_moment"].T)
