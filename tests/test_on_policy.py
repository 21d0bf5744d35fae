"""On-policy distillation (objective gkd): the student samples through a real vLLM engine in a child process, the
teacher scores its samples, the weights follow the student, and an interrupted run resumes onto the same samples."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distill.components.checkpointer import Checkpointer
from distill.components.metrics import read_metrics
from distill.components.rollouts import push_due, seeded_uniform
from distill.config import TrainConfig
from distill.data import DataConfig, SourceConfig
from distill.objectives.on_policy import OnPolicyDistillation
from distill.train import Trainer
from tests.distill_micro import micro_pair


@pytest.fixture(scope="module")
def micro(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return micro_pair(tmp_path_factory.mktemp("on-policy"), head_dim=32)  # vLLM's CPU attention has no kernel for 16


@pytest.fixture(autouse=True)
def cascade_home(micro: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CASCADE_HOME", str(micro["home"]))


def _config(micro: dict[str, Path], out: Path, **overrides: object) -> TrainConfig:
    values: dict[str, object] = dict(
        objective="gkd", student=str(micro["student"]), teacher=str(micro["teacher"]), out_dir=str(out),
        data=DataConfig(sources=[SourceConfig(kind="files", paths=[str(micro["corpus"] / "*.py")])], seq_len=48,
                        val_sequences=8),
        tokens=48 * 4 * 6, batch_size=4, eval={"every": 3}, checkpoint={"every": 2}, precision="float32",
        optim={"lr": 3e-3, "warmup_fraction": 0.0}, on_policy={"prompt_tokens": 16, "new_tokens": 24},
    )
    values.update(overrides)
    return TrainConfig.model_validate(values)


def test_on_policy_settings_are_checked_before_any_work(micro, tmp_path):
    with pytest.raises(ValueError, match="needs a live teacher, not teacher_top_k"):
        _config(micro, tmp_path, teacher_top_k=8)
    with pytest.raises(ValueError, match=r"checkpoint.every \(3\) must be a multiple of on_policy.sync_every \(2\)"):
        _config(micro, tmp_path, checkpoint={"every": 3}, on_policy={"sync_every": 2})
    with pytest.raises(ValueError, match=r"prompt_tokens \+ new_tokens \(16 \+ 40\) must fit in data.seq_len"):
        _config(micro, tmp_path, on_policy={"prompt_tokens": 16, "new_tokens": 40})
    with pytest.raises(ValueError, match=r"prompt_tokens \(64\) must leave room for sampled tokens"):
        _config(micro, tmp_path, on_policy={"new_tokens": None})
    with pytest.raises(ValueError, match="needs a teacher"):
        _config(micro, tmp_path, teacher=None)
    with pytest.raises(ValueError, match="mix"):
        _config(micro, tmp_path, on_policy={"mix": 1.5})


def _pushes(on_policy_steps: list[int], every: int, start: int = 0) -> list[int]:
    synced, pushed = None, []
    for step in on_policy_steps:
        if step >= start and push_due(synced, step, every):
            synced = step
            pushed.append(step)
    return pushed


def test_weights_are_pushed_where_a_resumed_run_pushes_them_too():
    steps = [0, 1, 2, 5, 6, 7, 9, 13, 14]  # the on-policy steps of a run with mix < 1
    assert _pushes(steps, 1) == steps
    assert _pushes(steps, 4) == [0, 5, 9, 13]  # the first on-policy step at or after each multiple of 4
    for checkpoint in (4, 8, 12):  # checkpoints fall on multiples of sync_every
        assert _pushes(steps, 4, start=checkpoint) == [s for s in _pushes(steps, 4) if s >= checkpoint]


def test_the_mix_is_a_seeded_share_of_steps():
    draws = [seeded_uniform(0, "mix", step) for step in range(2000)]
    assert draws == [seeded_uniform(0, "mix", step) for step in range(2000)]  # the same after a resume
    assert 0.45 < sum(d < 0.5 for d in draws) / len(draws) < 0.55


@pytest.fixture(scope="module")
def whole(micro: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One uninterrupted on-policy run (its vLLM engine starts once for the tests that read it)."""
    out = tmp_path_factory.mktemp("whole")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CASCADE_HOME", str(micro["home"]))
        trainer = Trainer(_config(micro, out / "run"), progress=False)
        assert isinstance(trainer.objective, OnPolicyDistillation)
        seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        sample = trainer.objective._samples

        def keep(rows, ids, step):
            samples, labels = sample(rows, ids, step)
            seen.append((ids.cpu(), samples.cpu(), labels.view(len(ids), -1).cpu()))
            return samples, labels

        trainer.objective._samples = keep
        final = trainer.train()  # the first two weight pushes check the engine's log-probs against the trainer's
    return {"trainer": trainer, "final": final, "seen": seen, "metrics": read_metrics(out / "run" / "metrics.jsonl")}


def test_the_student_learns_from_the_teacher_on_its_own_vllm_samples(whole):
    for ids, samples, targets in whole["seen"]:
        assert torch.equal(samples[:, :16], ids[:, :16])  # the prompt is the row's start
        assert (targets[:, :15] == -100).all()  # prompt positions are context, not targets
        assert ((targets[:, 15:] != -100).sum(-1) > 0).all()
    metrics = whole["metrics"]
    steps = [m for m in metrics if m["step"] > 0 and "loss" in m]
    assert len(steps) == 6 and all(m["on_policy"] == 1.0 and m["sample_tokens"] > 0 for m in steps)
    assert whole["final"]["val_kl"] < metrics[0]["val_kl"]  # learning on its own samples moves it to the teacher
    policy = whole["trainer"].objective.policy
    assert policy.pushes == 6 and policy.engine is None  # stopped with it


def test_an_interrupted_on_policy_run_resumes_onto_the_same_samples(micro, whole, tmp_path, monkeypatch):
    save = Checkpointer.save

    def save_then_die(self, step, *args, **kwargs):
        path = save(self, step, *args, **kwargs)
        if step == 4:
            raise KeyboardInterrupt  # killed just after the step-4 checkpoint
        return path

    monkeypatch.setattr(Checkpointer, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        Trainer(_config(micro, tmp_path / "cut"), progress=False).train()
    monkeypatch.setattr(Checkpointer, "save", save)
    resumed = Trainer(_config(micro, tmp_path / "cut"), progress=False).train(resume=True)
    a = [m for m in whole["metrics"] if "loss" in m]
    b = [m for m in read_metrics(tmp_path / "cut" / "metrics.jsonl") if "loss" in m]
    assert [m["step"] for m in a] == [m["step"] for m in b]
    assert [m["loss"] for m in a] == pytest.approx([m["loss"] for m in b], rel=1e-5)
    assert whole["final"]["val_kl"] == pytest.approx(resumed["val_kl"], rel=1e-5)


def test_an_engine_that_kept_old_weights_stops_the_run(micro, tmp_path):
    trainer = Trainer(_config(micro, tmp_path / "run"), progress=False)
    objective = trainer.objective
    try:
        objective.policy.sync(trainer.student, 0)  # starts the engine; its weights are the student's
        with torch.no_grad():
            for p in trainer.student.parameters():
                p.add_(0.05 * torch.randn_like(p))
        objective.policy.engine.load = lambda state, dtype: 0.0  # a weight push that changes nothing
        with pytest.raises(RuntimeError, match="log-probs differ from the trainer's"):
            objective.policy.sync(trainer.student, 1)
    finally:
        objective.close()


def test_mix_zero_is_plain_distillation_and_starts_no_engine(micro, tmp_path):
    trainer = Trainer(_config(micro, tmp_path / "run", tokens=48 * 4 * 2, on_policy={"mix": 0.0, "prompt_tokens": 16}),
                      progress=False)
    trainer.train()
    assert trainer.objective.policy.engine is None
    assert all(m.get("on_policy", 0.0) == 0.0 for m in read_metrics(tmp_path / "run" / "metrics.jsonl"))
