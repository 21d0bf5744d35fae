"""Preference optimisation (GPO): every f and the soft labels against float64 formulas, pair rows rendered by the
model's template (TRL's formats), the objective against a direct computation with its reference, normalisation
per pair under gradient accumulation, exact resume, LoRA's adapters-off reference, recipes from the CLI."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from distill.arithmetic import preference_pair, problems
from distill.components.metrics import read_metrics
from distill.components.models import Teacher
from distill.config import TrainConfig
from distill.data import DataError
from distill.model_io import load_model
from distill.objectives.preference import GPO_LOSSES, gpo_loss, sequence_logprobs
from distill.pair_data import render_pair
from distill.train import Trainer
from kernels.distill_loss import IGNORE_INDEX
from models.tokenizers import load_tokenizer
from tests.distill_micro import chat_micro_pair

ROOT = Path(__file__).resolve().parents[1]

# f(z) written out independently, in float64
FORMULAS = {
    "logistic": lambda z: math.log(1 + math.exp(-z)),
    "squared": lambda z: (z - 1) ** 2,
    "hinge": lambda z: max(0.0, 1 - z),
    "exponential": lambda z: math.exp(-z),
    "truncated_quadratic": lambda z: max(0.0, 1 - z) ** 2,
    "savage": lambda z: 1 / (1 + math.exp(z)) ** 2,
}
Z = [-2.5, -0.7, 0.0, 0.3, 0.999, 1.8, 4.0]
P = [1.0, 0.8, 0.5, 0.1]


@pytest.mark.parametrize("name", sorted(FORMULAS))
def test_every_gpo_loss_and_its_soft_labels_match_the_formula(name):
    z = torch.tensor(Z, dtype=torch.float64)
    assert set(GPO_LOSSES) == set(FORMULAS)
    for p in P:
        got = gpo_loss(z, torch.full_like(z, p), name)  # type: ignore[arg-type]
        sigma = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
        for zi, gi in zip(Z, got.tolist(), strict=True):
            if name == "logistic":  # Ministral 3's online DPO: -p log s(z) - (1 - p) log s(-z)
                want = -p * math.log(sigma(zi)) - (1 - p) * math.log(sigma(-zi))
            elif name == "squared":  # the IPO analogue (z - (2p - 1))^2
                want = (zi - (2 * p - 1)) ** 2
            else:
                want = p * FORMULAS[name](zi) + (1 - p) * FORMULAS[name](-zi)
            assert gi == pytest.approx(want, rel=1e-12, abs=1e-12), (p, zi)
        if p == 1.0:  # a hard label is f itself
            assert got.tolist() == pytest.approx([FORMULAS[name](zi) for zi in Z], rel=1e-12, abs=1e-12)


def test_soft_ipo_has_the_gradient_of_the_generic_soft_form():
    """(z - (2p - 1))^2 and p f(z) + (1 - p) f(-z) for the squared f differ by a constant: same gradient."""
    z = torch.tensor(Z, dtype=torch.float64, requires_grad=True)
    p = torch.tensor([0.9, 0.6, 0.5, 0.2, 1.0, 0.0, 0.7], dtype=torch.float64)
    (grad_ours,) = torch.autograd.grad(gpo_loss(z, p, "squared").sum(), z)
    f = GPO_LOSSES["squared"]
    (grad_generic,) = torch.autograd.grad((p * f(z) + (1 - p) * f(-z)).sum(), z)
    torch.testing.assert_close(grad_ours, grad_generic)


def test_sequence_logprobs_score_only_the_answers():
    torch.manual_seed(0)
    hidden, head = torch.randn(3, 5, 8, dtype=torch.float64), torch.randn(11, 8, dtype=torch.float64)
    labels = torch.randint(0, 11, (3, 5))
    labels[0, :3] = IGNORE_INDEX
    labels[2] = IGNORE_INDEX  # a row with no answer scores 0
    sums, counts = sequence_logprobs(hidden, head, labels.reshape(-1), chunk=2)
    full = (hidden @ head.T).log_softmax(-1).gather(-1, labels.clamp_min(0)[..., None])[..., 0]
    want = full.masked_fill(labels == IGNORE_INDEX, 0).sum(-1)
    torch.testing.assert_close(sums, want.float(), rtol=1e-5, atol=1e-5)
    assert counts.tolist() == [2, 5, 0]
    mean, _ = sequence_logprobs(hidden, head, labels.reshape(-1), average=True)
    torch.testing.assert_close(mean[:2], (want[:2] / torch.tensor([2.0, 5.0], dtype=torch.float64)).float(),
                               rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def micro_pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Micro models with a chat template and arithmetic preference pairs: conversational, plain strings, soft p."""
    micro = chat_micro_pair(tmp_path_factory.mktemp("prefer"))
    lines = []
    for n, p in enumerate(problems("train") + problems("heldout")):
        record = preference_pair(p)
        if n % 3 == 1:  # TRL's plain-string form
            record = {"prompt": p.question, "chosen": record["chosen"], "rejected": record["rejected"]}
        if n % 4 == 2:
            record["p"] = 0.75
        if n % 5 == 0:  # a longer chosen answer: rows differ in answer tokens
            record["chosen"] = [{"role": "assistant", "content": f"{p.a} {p.op} {p.b} is {p.answer}."}]
        lines.append(json.dumps(record))
    (micro["corpus"] / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return micro


@pytest.fixture
def prefer_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CASCADE_HOME", str(tmp_path_factory.getbasetemp() / "prefer-home"))


def _config(micro: dict[str, Path], out: Path, **overrides: object) -> TrainConfig:
    values: dict[str, object] = dict(
        objective="prefer", student=str(micro["student"]), out_dir=str(out),
        data={"format": "pairs", "paths": [str(micro["corpus"] / "pairs.jsonl")], "seq_len": 32, "val_pairs": 20},
        tokens=2 * 32 * 4 * 12, batch_size=4, eval={"every": 6}, checkpoint={"every": 6}, precision="float32",
        optim={"lr": 3e-3, "warmup_fraction": 0.1})
    values.update(overrides)
    return TrainConfig.model_validate(values)


def _answer(ids: list[int], targets: list[bool], tok) -> str:
    return tok.decode([i for i, t in zip(ids, targets, strict=True) if t])


def test_pairs_render_the_answers_alone_in_either_trl_format(smollm2):
    tok = load_tokenizer(smollm2)
    conversational = {"prompt": [{"role": "user", "content": "What is 2 plus 2?"}],
                      "chosen": [{"role": "assistant", "content": "4"}],
                      "rejected": [{"role": "assistant", "content": "5"}], "p": 0.9}
    (chosen, rejected), p = render_pair(conversational, smollm2, tok)
    assert p == 0.9
    assert _answer(*chosen, tok) == "4<|im_end|>\n" and _answer(*rejected, tok) == "5<|im_end|>\n"
    assert chosen[0][: -3] == rejected[0][: -3]  # the same rendered prompt before the answers
    plain, p = render_pair({"prompt": "What is 2 plus 2?", "chosen": "4", "rejected": "5"}, smollm2, tok)
    assert plain == [chosen, rejected] and p == 1.0
    # a multi-turn prompt: its own assistant turn is context, only the final answers are compared
    turns = {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                        {"role": "user", "content": "What is 2 plus 2?"}], "chosen": "4", "rejected": "5"}
    (chosen, rejected), _ = render_pair(turns, smollm2, tok)
    assert _answer(*chosen, tok) == "4<|im_end|>\n" and "Hello!" in tok.decode(chosen[0])


@pytest.mark.parametrize(("record", "message"), [
    ({"prompt": "x", "chosen": "a"}, "needs 'prompt', 'chosen' and 'rejected'"),
    ({"prompt": "x", "chosen": "a", "rejected": "b", "p": 1.5}, "'p' must be a number in \\[0, 1\\]"),
    ({"prompt": "x", "chosen": "a", "rejected": []}, "'rejected' must be a string or a non-empty list"),
    ({"prompt": "x", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "must end with an assistant"),
])
def test_bad_pairs_are_refused_with_the_reason(smollm2, record, message):
    with pytest.raises(DataError, match=message):
        render_pair(record, smollm2, load_tokenizer(smollm2))


@pytest.mark.usefixtures("prefer_home")
@pytest.mark.parametrize(("loss", "average", "sft"), [("logistic", False, 0.0), ("savage", True, 0.5)])
def test_the_objective_is_gpo_on_the_reference_log_ratios(micro_pairs, tmp_path, loss, average, sft):
    trainer = Trainer(_config(micro_pairs, tmp_path / "run", prefer={
        "loss": loss, "beta": 0.5, "average_logprobs": average, "sft_weight": sft}), progress=False)
    batch = trainer.train_data.batch(trainer.sampler.indices(0, 0), torch.device("cpu"))
    assert batch.ids.shape == (8, 32) and batch.preference is not None
    with torch.no_grad():  # the policy moves away from its reference (the starting weights)
        for p in trainer.student.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    loss_value, metrics = trainer.objective(trainer.student, batch, 0)
    reference = Teacher(load_model(micro_pairs["student"]))  # the starting weights, loaded independently
    labels = batch.labels.view(8, -1)
    live = labels != IGNORE_INDEX

    def logp(logits: torch.Tensor, per_token: bool) -> torch.Tensor:
        token = logits.double().log_softmax(-1).gather(-1, labels.clamp_min(0)[..., None])[..., 0]
        total = token.masked_fill(~live, 0).sum(-1)
        return total / live.sum(-1) if per_token else total

    with torch.no_grad():
        policy = trainer.student(batch.ids)
        ratio = logp(policy, average) - logp(reference.logits(batch.ids), average)
        nll = -logp(policy, True)[:4]  # per token, chosen answers
    z = 0.5 * (ratio[:4] - ratio[4:])
    p = batch.preference.double()
    f = lambda x: FORMULAS[loss](x)  # noqa: E731
    want = [pi * f(zi) + (1 - pi) * f(-zi) + sft * ni
            for zi, pi, ni in zip(z.tolist(), p.tolist(), nll.tolist(), strict=True)]
    assert loss_value.item() == pytest.approx(sum(want) / 4, rel=1e-5)
    assert metrics["tokens"].item() == 4  # normalised per pair
    assert metrics["reward_accuracy"].item() == pytest.approx((z > 0).double().mean().item())
    assert metrics["margin"].item() == pytest.approx(z.mean().item(), rel=1e-5, abs=1e-7)
    assert metrics["chosen_nll"].item() == pytest.approx(nll.mean().item(), rel=1e-5)


@pytest.mark.usefixtures("prefer_home")
def test_at_the_start_the_policy_is_its_reference(micro_pairs, tmp_path):
    trainer = Trainer(_config(micro_pairs, tmp_path / "run"), progress=False)
    batch = trainer.train_data.batch(trainer.sampler.indices(0, 0), torch.device("cpu"))
    loss, metrics = trainer.objective(trainer.student, batch, 0)
    assert metrics["margin"].abs().item() < 1e-6 and metrics["reward_accuracy"].item() == 0
    p = batch.preference.double()
    want = (p * math.log(2) + (1 - p) * math.log(2)).mean().item()  # logistic at z = 0
    assert loss.item() == pytest.approx(want, rel=1e-6)


@pytest.mark.usefixtures("prefer_home")
def test_gradient_accumulation_equals_one_big_batch_of_pairs(micro_pairs, tmp_path):
    one = Trainer(_config(micro_pairs, tmp_path / "one", batch_size=4, grad_accum=1), progress=False)
    two = Trainer(_config(micro_pairs, tmp_path / "two", batch_size=2, grad_accum=2), progress=False)
    for trainer in (one, two):  # away from the reference, where every gradient is the same constant
        torch.manual_seed(0)
        with torch.no_grad():
            for p in trainer.student.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    means = [trainer._forward_backward() for trainer in (one, two)]
    assert means[0]["loss"] == pytest.approx(means[1]["loss"], rel=1e-6)
    for (name, a), (_, b) in zip(one.student.named_parameters(), two.student.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.usefixtures("prefer_home")
def test_dpo_ranks_held_out_pairs_and_resumes_exactly(micro_pairs, tmp_path):
    settings = dict(tokens=2 * 32 * 8 * 24, batch_size=8, prefer={"beta": 0.5}, checkpoint={"every": 12},
                    eval={"every": 12})
    whole = Trainer(_config(micro_pairs, tmp_path / "whole", **settings), progress=False)
    final = whole.train()
    first = read_metrics(tmp_path / "whole" / "metrics.jsonl")[0]
    assert first["val_reward_accuracy"] == 0 and final["val_reward_accuracy"] > 0.6
    assert final["val_margin"] > 0.1 and final["val_loss"] < first["val_loss"]

    # a run cut after its step-12 checkpoint resumes to the same end
    cut = _config(micro_pairs, tmp_path / "cut", **settings)
    Trainer(cut, progress=False).train()
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-000024")
    resumed = Trainer(cut, progress=False).train(resume=True)
    for key in ("val_loss", "val_reward_accuracy", "val_margin", "val_ce"):
        assert resumed[key] == pytest.approx(final[key], rel=1e-6, abs=1e-9), key


@pytest.mark.usefixtures("prefer_home")
def test_lora_reference_is_the_base_with_adapters_off(micro_pairs, tmp_path):
    trainer = Trainer(_config(micro_pairs, tmp_path / "run", lora={"rank": 4}, optim={"lr": 1e-2},
                              prefer={"beta": 0.5}), progress=False)
    assert trainer.objective.reference is None  # no second copy of the weights
    batch = trainer.train_data.batch(trainer.sampler.indices(0, 0), torch.device("cpu"))
    final = trainer.train()
    assert final["val_loss"] < math.log(2) and final["val_margin"] > 0.1  # it learned (from log 2 and 0)
    base = Teacher(load_model(micro_pairs["student"]))
    with torch.no_grad():
        hidden, head = base(batch.ids)
        want, _ = sequence_logprobs(hidden, head, batch.labels)
    torch.testing.assert_close(trainer.objective._reference_logprobs(trainer.student, batch), want)
    _, metrics = trainer.objective(trainer.student, batch, 0)
    assert metrics["margin"].abs().item() > 0.1  # the adapters are on again afterwards


@pytest.mark.parametrize(("overrides", "message"), [
    ({"objective": "sft"}, "it needs data.format: chat"),
    ({"objective": "kd"}, "data.format pairs is for objective prefer, not kd"),
    ({"data": {"format": "chat", "paths": ["x.jsonl"]}}, "trains on preference pairs .data.format: pairs"),
    ({"teacher": "somewhere"}, "not a teacher"),
    ({"prefer": {"loss": "quadratic"}}, "prefer.loss"),
    ({"prefer": {"beta": 0}}, "prefer.beta"),
    ({"objective": "kd", "prefer": {"beta": 0.2}, "data": {"format": "chat", "paths": ["x.jsonl"]}},
     "the prefer section is for objective prefer"),
])
def test_bad_prefer_settings_name_the_problem(micro_pairs, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        _config(micro_pairs, tmp_path, **overrides)


def _cli(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CASCADE_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "distill", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def test_prefer_recipe_trains_registers_and_bad_ones_fail_first(micro_pairs, tmp_path):
    home = tmp_path / "home"
    recipe = {"name": "micro-dpo", "model": str(micro_pairs["student"]),
              "data": {"paths": [str(micro_pairs["corpus"] / "pairs.jsonl")], "seq_len": 32, "val_pairs": 20},
              "epochs": 1, "train": {"objective": "prefer", "batch_size": 8, "precision": "float32",
                                     "prefer": {"loss": "hinge", "beta": 0.5}, "optim": {"lr": 3e-3},
                                     "eval": {"every": 20}, "checkpoint": {"every": 20}}}
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump(recipe))
    done = _cli("posttrain", str(path), home=home)  # the objective comes from the recipe
    assert done.returncode == 0, done.stderr
    assert "held-out preference accuracy 0.000 ->" in done.stdout
    card = json.loads((home / "models" / "micro-dpo" / "cascade-card.json").read_text())
    assert card["prefer"]["loss"] == "hinge" and card["steps"] == math.ceil(280 / 8)
    assert card["final"]["val_reward_accuracy"] > card["before"]["val_reward_accuracy"]
    assert "GPO hinge at beta 0.5" in (home / "models" / "micro-dpo" / "README.md").read_text()
    assert (home / "registry" / "micro-dpo.json").is_file()
    again = _cli("prefer", str(path), home=home)
    assert again.returncode == 0 and "already done" in again.stdout

    wrong = _cli("sft", str(path), home=home)
    assert wrong.returncode == 2 and "this command runs sft" in wrong.stderr and "Traceback" not in wrong.stderr
    recipe["train"]["prefer"] = {"loss": "dpo"}
    path.write_text(yaml.safe_dump(recipe))
    bad = _cli("prefer", str(path), "--dry-run", home=home)
    assert bad.returncode == 2 and "train.prefer.loss" in bad.stderr and "Traceback" not in bad.stderr


def test_the_arithmetic_verifier_reads_the_question_from_the_prompt():
    from distill.verifiers import arithmetic

    prompt = "user: What is 1 plus 1?<|endoftext|>\nassistant: 2<|endoftext|>\nuser: What is 7 times 2?<|endoftext|>\n"
    assert arithmetic(prompt, "14") == 1.0 and arithmetic(prompt, "9, I think") == 0.0
    assert arithmetic(prompt, "7 times 2 is 14") == 0.0  # the first number is the answer (the task format)
    assert arithmetic("user: hello", "14") is None


@pytest.fixture(scope="module")
def online_pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """micro_pairs with vLLM-loadable micro models (vLLM's CPU attention has no kernel for head_dim 16)."""
    micro = chat_micro_pair(tmp_path_factory.mktemp("online"), head_dim=32)
    (micro["corpus"] / "pairs.jsonl").write_text("".join(
        json.dumps(preference_pair(p)) + "\n" for p in problems("train") + problems("heldout")))
    return micro


def _online(micro: dict[str, Path], out: Path, **online: object) -> TrainConfig:
    labels = online.get("labels", "arithmetic")
    return _config(micro, out, tokens=2 * 32 * 4 * 3, eval={"every": 3}, checkpoint={"every": 3},
                   teacher=str(micro["teacher"]) if labels == "teacher" else None,
                   prefer={"beta": 0.5, "online": {"new_tokens": 8, "temperature": 1.0, **online}})


@pytest.mark.usefixtures("prefer_home")
def test_online_labels_prefer_the_verified_answer_and_one_that_ends(online_pairs, tmp_path):
    trainer = Trainer(_online(online_pairs, tmp_path / "run"), progress=False)
    objective = trainer.objective
    tok, eos = objective.tokenizer, objective.policy.eos
    prompt = tok.encode_chat([{"role": "user", "content": "What is 7 times 2?"}])
    right, wrong = [*tok.encode("14"), eos], [*tok.encode("9"), eos]
    endless = (tok.encode("14 14 14 14 14 14") * 8)[:8]  # 8 = new_tokens, no end of sequence
    firsts, seconds = [right, wrong, right, endless, right], [wrong, right, right, wrong, endless]
    prompts = [prompt] * 5
    pairs = objective._pair_batch(torch.arange(5), prompts, firsts, seconds)
    p, weight, stats = objective._labels(pairs, prompts, firsts, seconds)
    # right > wrong; a tie leaves the pair out; an endless answer loses even when its first number is right
    assert p.tolist() == [1.0, 0.0, 0.5, 0.0, 1.0] and weight.tolist() == [1, 1, 0, 1, 1]
    assert stats["batch_unfinished"].item() == pytest.approx(2 / 10)
    assert stats["batch_decided"].item() == pytest.approx(4 / 5)
    live = (pairs.labels.view(10, -1) != IGNORE_INDEX).sum(-1)
    assert live.tolist() == [len(a) for a in firsts + seconds]  # the answers' tokens are the targets


@pytest.mark.usefixtures("prefer_home")
def test_online_preference_samples_from_the_policy_through_vllm(online_pairs, tmp_path):
    """The real engine: weights pushed each step and checked against the trainer's log-probs (first two pushes),
    pairs sampled and labelled by the teacher, the GPO loss trained on them."""
    trainer = Trainer(_online(online_pairs, tmp_path / "run", labels="teacher"), progress=False)
    first = trainer.evaluate()
    final = trainer.train()
    steps = [m for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in m]
    assert len(steps) == 3 and all(m["batch_decided"] > 0 and 0 <= m["batch_unfinished"] <= 1 for m in steps)
    assert trainer.objective.policy.pushes == 3 and trainer.objective.policy.engine is None  # stopped at the end
    assert final["val_loss"] != first["val_loss"]  # it trained (held-out pairs are the data's)


def test_online_settings_are_checked(online_pairs, tmp_path):
    with pytest.raises(ValueError, match="labels: teacher needs a teacher"):
        _config(online_pairs, tmp_path, prefer={"online": {"labels": "teacher"}})
    with pytest.raises(ValueError, match=r"must be a multiple of prefer\.online\.sync_every"):
        _config(online_pairs, tmp_path, checkpoint={"every": 3}, prefer={"online": {"sync_every": 2}})
    with pytest.raises(ValueError, match=r"prefer\.online\.labels"):
        _config(online_pairs, tmp_path, prefer={"online": {"labels": "judge"}})
