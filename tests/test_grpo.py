"""GRPO (objective grpo): rewards, advantages, the clipped loss and its normalisation, checked against their formulas;
then the objective on micro models with the real vLLM engine (weights pushed in place and checked after every push,
resume onto the same samples)."""

from __future__ import annotations

import itertools
import json
import re
from math import comb
from pathlib import Path

import pytest
import torch

from distill.arithmetic import problems
from distill.components.checkpointer import Checkpointer
from distill.components.metrics import read_metrics
from distill.config import GRPOConfig, TrainConfig
from distill.objectives.grpo import Rollouts, prompt_end, token_terms
from distill.rl import rewards as reward_module
from distill.rl.advantages import live_groups, magistral, normalise, pass_at_k
from distill.rl.policy_loss import clipped_token_loss, sequence_weights, truncated_is_weights
from distill.rl.rewards import Completion, RewardTerm, total_reward
from distill.train import Trainer
from kernels.distill_loss import IGNORE_INDEX
from tests.distill_micro import chat_micro_pair

# -- rewards ---------------------------------------------------------------------------------------------------


def _c(text: str, finished: bool = True, tokens: int = 4, max_tokens: int = 16,
       prompt: str = "user: What is 7 times 2?\nassistant: ") -> Completion:
    return Completion(prompt, text, tokens, finished, max_tokens)


@pytest.mark.parametrize(("text", "finished", "ok"), [
    ("<think>7 times 2 is 14</think>\n14", True, 1.0),
    ("  <think>\nseven twos\n</think>\n\n14", True, 1.0),
    ("<think>7 times 2 is 14</think>\n14", False, 0.0),  # cut at max tokens: no complete answer
    ("14", True, 0.0),  # no thinking
    ("<think>14</think>", True, 0.0),  # no answer after it (SmolLM2's habit: the answer inside the thinking)
    ("<think></think>14", True, 0.0),  # empty thinking
    ("<think>a</think>b<think>c</think>d", True, 0.0),  # markers more than once
    ("so <think>a</think>14", True, 0.0),  # text before the thinking
])
def test_the_format_reward_wants_one_closed_thinking_then_an_answer(text, finished, ok):
    assert reward_module.think_format(_c(text, finished)) == ok


def test_correctness_grades_the_answer_after_the_thinking():
    assert reward_module.arithmetic(_c("<think>maybe 9? no, 7+7</think>14")) == 1.0
    assert reward_module.arithmetic(_c("<think>7 times 2 is 14</think>9")) == 0.0  # the thinking is not the answer
    assert reward_module.arithmetic(_c("14, since 7 + 7 = 14")) == 1.0
    assert reward_module.arithmetic(_c("14", prompt="user: hello")) == 0.0  # not a question it can check


def test_the_length_penalty_is_dapo_soft_overlong():
    length = reward_module.length
    assert length(_c("x", tokens=12), cache_tokens=4) == 0.0  # up to max - cache: no penalty
    assert length(_c("x", tokens=14), cache_tokens=4) == pytest.approx(-0.5)
    assert length(_c("x", tokens=16), cache_tokens=4) == pytest.approx(-1.0)
    assert length(_c("x", finished=False, tokens=16), cache_tokens=4) == -1.0


def test_rewards_combine_by_weight_and_a_failed_gate_zeroes_them():
    terms = [RewardTerm(name="think_format", weight=0.1, gate=True), RewardTerm(name="arithmetic", weight=0.9),
             RewardTerm(name="length", weight=0.1, cache_tokens=4)]
    assert total_reward(terms, _c("<think>7+7</think>14"))[0] == pytest.approx(1.0)
    assert total_reward(terms, _c("<think>7+7</think>9"))[0] == pytest.approx(0.1)
    assert total_reward(terms, _c("<think>7+7</think>14", tokens=14))[0] == pytest.approx(0.95)
    total, scores = total_reward(terms, _c("14"))  # right, but not in the format: Magistral grades it 0
    assert total == 0.0 and scores["arithmetic"] == 1.0


def test_the_code_reward_runs_the_prompts_tests_in_the_sandbox():
    prompt = "Write add(a, b). Your code should pass these tests:\nassert add(1, 2) == 3\nassert add(0, 0) == 0\n"
    right = "```python\ndef add(a, b):\n    return a + b\n```"
    assert reward_module.code(_c(right, prompt=prompt)) == 1.0
    assert reward_module.code(_c(right.replace("a + b", "a - b"), prompt=prompt)) == 0.0
    escape = "```python\nimport socket\nsocket.create_connection(('1.1.1.1', 80))\ndef add(a, b): return a + b\n```"
    assert reward_module.code(_c(escape, prompt=prompt)) == 0.0  # no network in the sandbox
    assert reward_module.code(_c(right, prompt="no tests here")) == 0.0


@pytest.mark.parametrize(("terms", "message"), [
    ([{"name": "nope"}], "unknown reward 'nope'"),
    ([{"name": "length"}], "length needs it"),
    ([{"name": "arithmetic", "cache_tokens": 3}], "only for the length reward"),
    ([{"name": "arithmetic"}, {"name": "arithmetic"}], "each function once"),
])
def test_bad_reward_lists_name_the_problem(terms, message):
    with pytest.raises(ValueError, match=message):
        GRPOConfig(rewards=terms)


# -- advantages --------------------------------------------------------------------------------------------------


def test_magistral_advantages_drop_equal_groups_and_normalise_over_the_step():
    rewards = torch.tensor([[1.0, 0, 0, 1], [1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.float64)
    live = live_groups(rewards)
    assert live.tolist() == [True, False, False, True]
    centred = magistral(rewards)
    assert centred[0].tolist() == [0.5, -0.5, -0.5, 0.5] and centred[1].abs().sum() == 0  # no division by std
    out = normalise(centred, live)
    values = out[live]
    assert values.mean().abs() < 1e-9 and values.std(unbiased=False) == pytest.approx(1.0, abs=1e-5)
    assert out[~live].abs().sum() == 0


@pytest.mark.parametrize(("n", "k"), [(4, 1), (4, 2), (6, 3), (8, 8)])
def test_pass_at_k_advantage_is_what_a_sample_adds_to_the_groups_pass_at_k(n, k):
    """Enumerated: a sample's advantage is the mean success of the k-subsets that contain it minus the mean over
    all k-subsets (the group's pass@k); k = 1 is r - mean."""
    for c in range(n + 1):
        rewards = torch.tensor([[1.0] * c + [0.0] * (n - c)])
        subsets = list(itertools.combinations(range(n), k))
        success = {s: float(any(rewards[0, i] > 0.5 for i in s)) for s in subsets}
        group = sum(success.values()) / len(subsets)
        assert group == pytest.approx(1 - comb(n - c, k) / comb(n, k))
        want = [sum(success[s] for s in subsets if i in s) / sum(1 for s in subsets if i in s) - group
                for i in range(n)]
        assert pass_at_k(rewards, k)[0].tolist() == pytest.approx(want)
    if k == 1:
        r = torch.tensor([[1.0, 0, 1, 0]])
        assert torch.allclose(pass_at_k(r, 1), magistral(r))


# -- the loss -------------------------------------------------------------------------------------------------------


def test_the_clipped_loss_clips_higher_above_and_counts_what_it_clipped():
    logp = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5, 1.1]))  # ratios against old log-probs of 0
    old = torch.zeros(5)
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0])
    loss, low, high = clipped_token_loss(logp, old, advantages, 0.2, 0.28)
    assert loss.tolist() == pytest.approx([-1.28, 1.5, -0.5, 0.8, -1.1])  # -min(rA, clip(r)A)
    assert high.tolist() == [True, False, False, False, False] and low.tolist() == [False, False, False, True, False]
    weights = truncated_is_weights(torch.log(torch.tensor([0.5, 0.5])), torch.log(torch.tensor([0.1, 0.4])), 2.0)
    assert weights.tolist() == pytest.approx([2.0, 1.25])  # min(pi_old / mu, cap)
    assert truncated_is_weights(old, old + 5, None).tolist() == [1.0] * 5


def test_group_normalisation_divides_each_group_by_its_own_tokens():
    lengths, groups = torch.tensor([2, 4, 1, 1]), torch.tensor([0, 0, 1, 1])
    weights, units = sequence_weights(lengths, groups, "group")
    assert weights.tolist() == pytest.approx([1 / 6, 1 / 6, 1 / 2, 1 / 2]) and units == 2
    weights, units = sequence_weights(lengths, groups, "tokens")
    assert weights.tolist() == [1, 1, 1, 1] and units == 8
    weights, units = sequence_weights(lengths, groups, "sequence")
    assert weights.tolist() == pytest.approx([1 / 2, 1 / 4, 1, 1]) and units == 4


def test_prompt_end_is_the_start_of_the_final_answer():
    targets = torch.tensor([False, False, True, True, False, False, True, True, True, False])
    assert prompt_end(targets) == 6
    assert prompt_end(torch.zeros(4, dtype=torch.bool)) == 4


def test_token_terms_match_full_logits_and_a_teachers_kl():
    torch.manual_seed(0)
    hidden, head = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(11, 8)
    teacher_hidden, teacher_head = torch.randn(2, 5, 8), torch.randn(11, 8)
    labels = torch.full((2, 5), IGNORE_INDEX)
    labels[0, 3:], labels[1, 1:4] = torch.tensor([1, 2]), torch.tensor([3, 4, 5])
    terms = token_terms(hidden, head, labels.reshape(-1), 0.7, teacher_hidden, teacher_head, chunk=2)
    live = labels.reshape(-1) != IGNORE_INDEX
    logits = (hidden.reshape(-1, 8).float() @ head.T)[live]
    logprobs = (logits / 0.7).log_softmax(-1)
    assert torch.allclose(terms[0], logprobs.gather(-1, labels.reshape(-1)[live, None])[:, 0], atol=1e-5)
    assert torch.allclose(terms[1], -(logprobs.exp() * logprobs).sum(-1), atol=1e-5)
    t = (teacher_hidden.reshape(-1, 8) @ teacher_head.T)[live].log_softmax(-1)
    kl = (t.exp() * (t - logits.log_softmax(-1))).sum(-1)  # KL(teacher || student) at temperature 1
    assert torch.allclose(terms[2], kl, atol=1e-5)


# -- the objective on micro models ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def micro_rl(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    micro = chat_micro_pair(tmp_path_factory.mktemp("grpo"), head_dim=32)  # vLLM's CPU attention needs head_dim 32
    lines = [json.dumps(p.conversation()) for p in problems("train") + problems("heldout")]
    (micro["corpus"] / "chat.jsonl").write_text("\n".join(lines) + "\n")
    return micro


@pytest.fixture
def rl_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CASCADE_HOME", str(tmp_path_factory.getbasetemp() / "grpo-home"))


@pytest.fixture
def parity(monkeypatch: pytest.MonkeyPatch) -> None:
    """A reward a random micro model earns half the time (the real ones need a model that can do the task)."""
    monkeypatch.setitem(reward_module.REWARDS, "parity", lambda c: float(len(c.text) % 2))


def _config(micro: dict[str, Path], out: Path, **overrides: object) -> TrainConfig:
    grpo = {"group_size": 4, "new_tokens": 6, "rewards": [{"name": "parity"}], **overrides.pop("grpo", {})}
    values: dict[str, object] = dict(
        objective="grpo", student=str(micro["student"]), out_dir=str(out),
        data={"format": "chat", "paths": [str(micro["corpus"] / "chat.jsonl")], "seq_len": 32,
              "val_conversations": 8, "packing": False},
        tokens=32 * 4 * 4, batch_size=4, eval={"every": 2}, checkpoint={"every": 2}, precision="float32",
        optim={"lr": 1e-2, "warmup_fraction": 0.0}, grpo=grpo)
    values.update(overrides)
    return TrainConfig.model_validate(values)


@pytest.mark.usefixtures("rl_home", "parity")
@pytest.mark.parametrize(("overrides", "message"), [
    ({"data": {"format": "chat", "paths": ["x.jsonl"], "packing": True}}, "set data.packing: false"),
    ({"grpo": {"kd_weight": 0.5}}, "distils from a teacher: give one"),
    ({"grpo": {"minibatches": 3}}, r"checkpoint.every \(2\) must be a multiple of grpo.minibatches \(3\)"),
    ({"grpo": {"pass_k": 2}}, "pass_k is for advantage: passk"),
    ({"grpo": {"advantage": "passk", "pass_k": 9}}, "at most group_size"),
    ({"teacher_top_k": 8}, "teacher_top_k"),
])
def test_bad_grpo_settings_name_the_problem(micro_rl, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        _config(micro_rl, tmp_path, **overrides)


def _fake_samples(objective, prompts: list[list[int]], seed: int) -> list[tuple[list[int], list[float]]]:
    """Completions of uneven lengths (some ending in EOS) with engine log-probs near the trainer's."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, _ in enumerate(prompts):
        n = 1 + (i * 5 + seed) % 6
        tokens = torch.randint(3, 300, (n,), generator=g).tolist()
        if i % 3 == 0:
            tokens[-1] = objective.policy.eos
        out.append((tokens, (-2.0 - torch.rand(n, generator=g)).tolist()))
    return out


def _inject(trainer: Trainer, step: int, groups_per_micro: list[int], seed: int = 0) -> None:
    """This step's rollouts built from fixed completions (no engine): the same samples whatever the micro-batches."""
    objective = trainer.objective
    g = objective.settings.group_size
    prompts = [objective.prompts[r] for r in range(sum(groups_per_micro)) for _ in range(g)]
    samples = _fake_samples(objective, prompts, seed)
    rewards = torch.tensor([float(i % 2 == (i // g) % 2 or i % 5 == 0) for i in range(len(prompts))],
                           dtype=torch.float64)
    parts, start = [], 0
    for n in groups_per_micro:
        part = slice(start * g, (start + n) * g)
        parts.append((prompts[part], samples[part], rewards[part].view(-1, g), {}))
        start += n
    objective._rollouts[step] = objective._prepare(trainer.student, parts)


@pytest.mark.usefixtures("rl_home", "parity")
@pytest.mark.parametrize("normalisation", ["group", "tokens", "sequence"])
def test_gradient_accumulation_equals_one_big_batch_of_groups(micro_rl, tmp_path, normalisation):
    """Four groups as one micro-batch, or as 1 + 3 (uneven on purpose): the same gradient, because the loss is a sum
    over groups (tokens, sequences) divided by the step's total, not a mean per micro-batch."""
    grads = []
    for layout, accum in (([4], 1), ([1, 3], 2)):
        trainer = Trainer(_config(micro_rl, tmp_path / f"{normalisation}-{accum}", batch_size=4 // accum,
                                  grad_accum=accum, grpo={"normalisation": normalisation}), progress=False)
        _inject(trainer, 0, layout)
        trainer._forward_backward()
        grads.append(torch.cat([p.grad.flatten() for p in trainer.student.parameters()]))
        trainer.objective.close()
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-8)


@pytest.mark.usefixtures("rl_home", "parity")
def test_the_loss_is_the_clipped_objective_per_group_tokens(micro_rl, tmp_path):
    trainer = Trainer(_config(micro_rl, tmp_path / "run", grpo={"tis_cap": 1.5}), progress=False)
    _inject(trainer, 0, [4])
    rollouts: Rollouts = trainer.objective._rollouts[0][0]
    live = rollouts.advantages != 0
    loss, metrics = trainer.objective(trainer.student, None, 0)
    # by hand: token log-probs from full logits; ratio 1 on-policy; TIS weights against the engine's log-probs
    with torch.no_grad():
        logits = trainer.student(rollouts.ids).reshape(-1, trainer.student.lm.config.vocab_size)
    mask = rollouts.labels != IGNORE_INDEX
    logp = logits[mask].log_softmax(-1).gather(-1, rollouts.labels[mask, None])[:, 0]
    sequence = mask.nonzero()[:, 0] // (rollouts.ids.shape[1] - 1)
    weights = torch.exp(logp - rollouts.engine_logp).clamp(max=1.5)
    per_token = -rollouts.advantages[sequence] * weights
    group_tokens = torch.zeros(4).index_add(0, rollouts.groups, rollouts.lengths.float())
    want = (per_token / group_tokens[rollouts.groups[sequence]]).sum() / len(rollouts.groups.unique())
    assert loss.item() == pytest.approx(want.item(), rel=1e-4)
    assert metrics["tokens"].item() == len(rollouts.groups.unique())
    assert live.any() and metrics["batch_clip_low"].item() == 0 == metrics["batch_clip_high"].item()
    assert 0 < metrics["batch_is_weight"].item() <= 1.5
    trainer.objective.close()


@pytest.mark.usefixtures("rl_home", "parity")
def test_a_step_whose_groups_all_agree_trains_nothing(micro_rl, tmp_path):
    trainer = Trainer(_config(micro_rl, tmp_path / "run"), progress=False)
    objective = trainer.objective
    prompts = [objective.prompts[0]] * 8
    rewards = torch.ones(2, 4, dtype=torch.float64)
    objective._rollouts[0] = objective._prepare(trainer.student, [(prompts, _fake_samples(objective, prompts, 1),
                                                                   rewards, {})])
    means = trainer._forward_backward()
    assert means["batch_zero_std_groups"] == 1.0
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in trainer.student.parameters())
    objective.close()


@pytest.mark.usefixtures("rl_home", "parity")
def test_asymmetric_reinforce_keeps_every_group_with_a_baseline_below_the_mean(micro_rl, tmp_path):
    trainer = Trainer(_config(micro_rl, tmp_path / "run", grpo={"loss": "asymmetric", "asymmetric_offset": -0.1}),
                      progress=False)
    objective = trainer.objective
    prompts = [objective.prompts[0]] * 8
    rewards = torch.tensor([[1.0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.float64)
    objective._rollouts[0] = objective._prepare(trainer.student, [(prompts, _fake_samples(objective, prompts, 2),
                                                                   rewards, {})])
    rollouts = objective._rollouts[0][0]
    want = rewards - rewards.mean(-1, keepdim=True) + 0.1  # r - V, V = mean - 0.1; no normalisation
    assert rollouts.advantages.tolist() == pytest.approx(want.flatten().tolist())  # the agreeing group stays
    loss, metrics = objective(trainer.student, None, 0)
    assert metrics["tokens"].item() == 2 and torch.isfinite(loss)
    objective.close()


@pytest.mark.usefixtures("rl_home", "parity")
def test_the_kd_term_is_the_teachers_kl_on_the_samples_even_where_rewards_agree(micro_rl, tmp_path):
    """RL and distillation in one loss: with every group's rewards equal the policy gradient is 0, and what is left is
    lambda x KL(teacher || student) over the vocabulary at each sampled token, per group's tokens."""
    trainer = Trainer(_config(micro_rl, tmp_path / "run", teacher=str(micro_rl["teacher"]),
                              grpo={"kd_weight": 0.5}), progress=False)
    objective = trainer.objective
    prompts = [objective.prompts[0]] * 4 + [objective.prompts[1]] * 4
    objective._rollouts[0] = objective._prepare(trainer.student, [(prompts, _fake_samples(objective, prompts, 3),
                                                                   torch.ones(2, 4, dtype=torch.float64), {})])
    rollouts = objective._rollouts[0][0]
    assert len(rollouts.ids) == 8 and rollouts.advantages.abs().sum() == 0  # kept, with nothing for the RL term
    loss, metrics = objective(trainer.student, None, 0)
    with torch.no_grad():
        student = trainer.student(rollouts.ids).log_softmax(-1)
        teacher = objective.teacher.logits(rollouts.ids).log_softmax(-1)
    mask = (rollouts.labels != IGNORE_INDEX).view(8, -1)
    kl = (teacher.exp() * (teacher - student)).sum(-1)[mask]  # [n]
    sequence = mask.nonzero()[:, 0]
    group_tokens = torch.zeros(2).index_add(0, rollouts.groups, rollouts.lengths.float())
    want = 0.5 * (kl / group_tokens[rollouts.groups[sequence]]).sum() / 2
    assert loss.item() == pytest.approx(want.item(), rel=1e-4) and metrics["batch_kd"].item() > 0
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.student.parameters())
    objective.close()


@pytest.fixture(scope="module")
def whole(micro_rl: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One uninterrupted run on the real engine: 4 steps, one generation per 2 steps (the second trains on the older
    weights' samples, where the clip and the importance weights act), held-out greedy reward every 2 steps."""
    out = tmp_path_factory.mktemp("grpo-whole")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CASCADE_HOME", str(tmp_path_factory.getbasetemp() / "grpo-home"))
        mp.setitem(reward_module.REWARDS, "parity", lambda c: float(len(c.text) % 2))
        trainer = Trainer(_config(micro_rl, out / "run", grpo={"minibatches": 2}), progress=False)
        seen: list[list[tuple[list[int], list[float]]]] = []
        sample = trainer.objective.policy.sample

        def keep(*args, **kwargs):
            out_ = sample(*args, **kwargs)
            seen.append(out_)
            return out_

        trainer.objective.policy.sample = keep
        final = trainer.train()
    return {"trainer": trainer, "final": final, "seen": seen, "metrics": read_metrics(out / "run" / "metrics.jsonl")}


def test_grpo_samples_through_vllm_with_weights_pushed_in_place(whole):
    steps = [m for m in whole["metrics"] if "loss" in m]
    assert len(steps) == 4 and len(whole["seen"]) == 2  # one generation per two steps
    for batch in whole["seen"]:
        assert len(batch) == 2 * 4 * 4  # two steps x 4 prompts x 4 samples
        assert all(len(lps) == len(tokens) and all(lp <= 0 for lp in lps) for tokens, lps in batch)
    for m in steps:
        assert 0 <= m["batch_zero_std_groups"] <= 1 and m["batch_entropy"] > 0 and m["batch_completion_tokens"] > 0
        assert m["batch_engine_gap"] < 1e-3  # the engine's sampling log-probs are the trainer's (fp32)
        assert m["batch_generate_s"] > 0 and "batch_clip_high" in m and "elapsed_s" in m
    assert steps[0]["batch_policy_drift"] == 0 < steps[1]["batch_policy_drift"]  # the 2nd trains on older samples
    # pushes: at the first evaluation (engine start), after steps 2 and 4 for the evaluations; the step-2 generation
    # found the engine already holding step 2's weights. Every push was checked on the probe.
    policy = whole["trainer"].objective.policy
    assert policy.pushes == 3 and policy.engine is None
    assert (Path(whole["trainer"].out) / "rewards.png").stat().st_size > 1000  # the reward curves, as a picture
    evaluations = [m for m in whole["metrics"] if "val_reward" in m]
    assert [m["step"] for m in evaluations] == [0, 2, 4]
    assert all(0 <= m["val_reward"] <= 1 for m in evaluations)


def test_an_interrupted_grpo_run_resumes_onto_the_same_samples(micro_rl, whole, tmp_path, monkeypatch):
    monkeypatch.setenv("CASCADE_HOME", str(tmp_path.parent / "grpo-home-resume"))
    monkeypatch.setitem(reward_module.REWARDS, "parity", lambda c: float(len(c.text) % 2))
    save = Checkpointer.save

    def save_then_die(self, step, *args, **kwargs):
        path = save(self, step, *args, **kwargs)
        if step == 2:
            raise KeyboardInterrupt  # killed just after the step-2 checkpoint
        return path

    monkeypatch.setattr(Checkpointer, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        Trainer(_config(micro_rl, tmp_path / "cut", grpo={"minibatches": 2}), progress=False).train()
    monkeypatch.setattr(Checkpointer, "save", save)
    Trainer(_config(micro_rl, tmp_path / "cut", grpo={"minibatches": 2}), progress=False).train(resume=True)
    a = [m for m in whole["metrics"] if "loss" in m]
    b = [m for m in read_metrics(tmp_path / "cut" / "metrics.jsonl") if "loss" in m]
    assert [m["step"] for m in a] == [m["step"] for m in b]
    assert [m["batch_reward_mean"] for m in a] == [m["batch_reward_mean"] for m in b]  # the same samples
    assert [m["loss"] for m in a] == pytest.approx([m["loss"] for m in b], rel=1e-4, abs=1e-7)


# -- recipes: a cold start, then GRPO, registered with its reasoning format --------------------------------------


def test_the_shipped_cold_start_data_trains_no_held_out_problem_and_no_eval_question():
    from distill.arithmetic import Problem, split_of
    from distill.think_data import eval_questions

    records = [json.loads(line) for line in Path("distill/prompts/think-cold-start.jsonl").read_text().splitlines()]
    asked = eval_questions()
    assert asked and len(records) > 100
    for record in records:
        user, assistant = record["messages"]
        assert user["content"].strip().casefold() not in asked
        assert assistant["reasoning"] and assistant["content"]
        found = re.fullmatch(r"What is (\d+) (plus|minus|times) (\d+)\?", user["content"])
        if found:
            problem = Problem(int(found[1]), found[2], int(found[3]))
            assert split_of(problem) == "train" and assistant["content"] == str(problem.answer)


@pytest.mark.usefixtures("rl_home", "parity")
def test_a_grpo_recipe_runs_after_its_cold_start_and_registers_its_reasoning_format(micro_rl, tmp_path, capsys):
    from distill.__main__ import main
    from models.registry import get_model

    thinking = [{"messages": [{"role": "user", "content": p.question},
                              {"role": "assistant", "reasoning": f"{p.a} {p.op} {p.b}", "content": str(p.answer)}]}
                for p in problems("train")[:40]]
    data = tmp_path / "think.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in thinking))
    common = {"data": {"paths": [str(data)], "seq_len": 48, "val_conversations": 8}, "seed": 0,
              "reasoning_format": "think-tags"}
    (tmp_path / "cold.yaml").write_text(json.dumps({
        "name": "micro-think-sft", "model": str(micro_rl["student"]), "tokens": 48 * 4 * 2, **common,
        "train": {"objective": "sft", "batch_size": 4, "precision": "float32", "eval": {"every": 2},
                  "checkpoint": {"every": 2}}}))
    (tmp_path / "rl.yaml").write_text(json.dumps({
        "name": "micro-think", "model": "micro-think-sft", "after": "cold.yaml", "tokens": 48 * 4 * 2, **common,
        "train": {"objective": "grpo", "batch_size": 4, "precision": "float32", "eval": {"every": 2},
                  "checkpoint": {"every": 2}, "grpo": {"group_size": 2, "new_tokens": 6,
                                                      "rewards": [{"name": "parity"}]}}}))
    assert main(["grpo", str(tmp_path / "rl.yaml"), "--dry-run"]) == 0
    assert "first: micro-think-sft (sft" in capsys.readouterr().out
    assert main(["grpo", str(tmp_path / "rl.yaml")]) == 0
    assert get_model("micro-think").reasoning_format == "think-tags"
    assert get_model("micro-think-sft").reasoning_format == "think-tags"
    card = json.loads((get_model("micro-think").path / "cascade-card.json").read_text())
    assert card["objective"] == "grpo" and card["grpo"]["group_size"] == 2 and "val_reward" in card["final"]
    # a chain whose model is not its predecessor's result is refused before any work
    (tmp_path / "bad.yaml").write_text((tmp_path / "rl.yaml").read_text().replace('"micro-think-sft"', '"other"'))
    assert main(["grpo", str(tmp_path / "bad.yaml")]) != 0
    assert "its model must be that recipe's result 'micro-think-sft'" in capsys.readouterr().err


def test_the_grpo_section_is_replaced_in_place_and_survives_the_other_benchmark(tmp_path):
    from distill.grpo_bench import SECTION_END, SECTION_START, write_section
    from distill.posttrain_bench import _kept_section

    doc = tmp_path / "posttrain-results.md"
    doc.write_text("# Post-training\n\nSFT rows\n")
    write_section(f"{SECTION_START}\nfirst\n{SECTION_END}\n", doc)
    write_section(f"{SECTION_START}\nsecond\n{SECTION_END}\n", doc)
    text = doc.read_text()
    assert text.startswith("# Post-training\n\nSFT rows") and "second" in text and "first" not in text
    assert _kept_section(doc) == f"{SECTION_START}\nsecond\n{SECTION_END}"


@pytest.mark.usefixtures("rl_home")
def test_many_seeded_prompts_at_once_sample_on_the_cpu_engine(micro_rl):
    """More prompt tokens than one engine step takes, every request seeded: the engine must not split a prompt
    (vLLM rewinds a split request's seeded generator with set_offset, which CPU generators do not have)."""
    from distill.components.rollouts import RolloutEngine, eos_id

    engine = RolloutEngine(micro_rl["student"], 64, "float32", 0.25, 0, eos_id(micro_rl["student"]))
    try:
        prompts = [[(7 * i + j) % 300 + 3 for j in range(48)] for i in range(256)]  # 12k prompt tokens
        out = engine.sample(prompts, 4, 1.0, list(range(256)))
        assert len(out) == 256 and all(1 <= len(tokens) == len(lps) <= 4 for tokens, lps in out)
        assert engine.sample(prompts[:2], 4, 1.0, [0, 1]) == out[:2]  # seeded: the same draws again
    finally:
        engine.close()
