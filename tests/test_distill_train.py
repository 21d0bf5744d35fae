"""The distillation trainer on micro models: it learns, resumes exactly after SIGKILL, stops on NaN, runs FSDP2."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from distill.components.checkpointer import CheckpointMismatchError
from distill.components.metrics import read_metrics
from distill.config import TrainConfig
from distill.data import DataConfig, SourceConfig
from distill.losses import VocabMismatchError
from distill.train import Trainer, TrainingDivergedError
from models.checkpoint import COMPLETE_MARKER
from tests.distill_micro import micro_pair, write_micro_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def micro(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return micro_pair(tmp_path_factory.mktemp("micro"))


@pytest.fixture(autouse=True)
def cascade_home(micro: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CASCADE_HOME", str(micro["home"]))


def _config(micro: dict[str, Path], out: Path, **overrides: object) -> TrainConfig:
    values: dict[str, object] = dict(
        student=str(micro["student"]), teacher=str(micro["teacher"]), out_dir=str(out),
        data=DataConfig(sources=[SourceConfig(kind="files", paths=[str(micro["corpus"] / "*.py")])], seq_len=32,
                        val_sequences=8),
        tokens=32 * 4 * 30, batch_size=4, eval={"every": 10}, checkpoint={"every": 10}, precision="float32",
        optim={"lr": 3e-3, "warmup_fraction": 0.1},
    )
    values.update(overrides)
    return TrainConfig.model_validate(values)


def _cli(args: list[str], env_extra: dict[str, str] | None = None, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "distill", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _write(config: TrainConfig, path: Path) -> Path:
    path.write_text(yaml.safe_dump(json.loads(config.model_dump_json())))
    return path


def test_distillation_lowers_kl_to_the_teacher_and_writes_curves(micro, tmp_path):
    trainer = Trainer(_config(micro, tmp_path / "run"), progress=False)
    final = trainer.train()
    metrics = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert metrics[0]["step"] == 0 and metrics[-1]["step"] == 30 == trainer.total_steps
    assert final["val_kl"] < 0.7 * metrics[0]["val_kl"]
    assert (tmp_path / "run" / "loss.png").stat().st_size > 10_000
    assert all(json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert kept == ["step-000020", "step-000030"]  # checkpoint.keep = 2
    out = trainer.export(tmp_path / "student", {"note": "test"})
    assert json.loads((out / "cascade-card.json").read_text()) == {"note": "test"}
    assert (out / "tokenizer.json").is_file() and not list(out.glob("*.bin"))


def test_resume_after_sigkill_ends_where_an_uninterrupted_run_ends(micro, tmp_path):
    whole = _write(_config(micro, tmp_path / "whole", tokens=32 * 4 * 60), tmp_path / "whole.yaml")
    killed = _write(_config(micro, tmp_path / "killed", tokens=32 * 4 * 60), tmp_path / "killed.yaml")
    first = _cli(["train", str(whole)])
    assert first.wait(timeout=300) == 0, first.stderr.read()

    victim = _cli(["train", str(killed)])
    marker = tmp_path / "killed" / "checkpoints" / "step-000030" / COMPLETE_MARKER
    deadline = time.monotonic() + 300
    while not marker.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    steps_before = read_metrics(tmp_path / "killed" / "metrics.jsonl")[-1]["step"]
    assert 30 <= steps_before < 60

    resumed = _cli(["train", str(killed), "--resume"])
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    a = read_metrics(tmp_path / "whole" / "metrics.jsonl")
    b = read_metrics(tmp_path / "killed" / "metrics.jsonl")
    assert [m["step"] for m in b] == [m["step"] for m in a]  # the log was cut back to the checkpoint, no duplicates
    for x, y in zip(a, b, strict=True):
        assert x["loss" if "loss" in x else "val_ce"] == pytest.approx(y["loss" if "loss" in y else "val_ce"],
                                                                       rel=1e-6, abs=1e-7)
    assert a[-1]["val_kl"] == pytest.approx(b[-1]["val_kl"], rel=1e-6)


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(micro, tmp_path):
    trainer = Trainer(_config(micro, tmp_path / "run", tokens=32 * 4 * 8, checkpoint={"every": 2}), progress=False)
    calls = 0

    def corrupt_after_step_4(module, args, output):  # the teacher goes bad mid-run: every KD loss is NaN from then
        nonlocal calls
        calls += 1
        return output * float("nan") if calls > 2 + 4 else output  # 2 evaluation batches, then one call a step

    trainer.objective.teacher.lm.model.norm.register_forward_hook(corrupt_after_step_4)
    with pytest.raises(TrainingDivergedError, match=r"loss is nan at step 4.*step-000004"):
        trainer.train()
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-000002", "step-000004"]


def test_fused_loss_and_cascade_attention_train_like_the_defaults(micro, tmp_path, monkeypatch):
    """The fused linear KD loss and the Triton attention (interpreter on CPU) give the run the default chunked loss
    and sdpa give; `fused_loss: auto` turns the fused loss on from FUSED_MIN_VOCAB entries."""
    import distill.objectives.kd

    tokens = 32 * 4 * 4
    base = Trainer(_config(micro, tmp_path / "base", tokens=tokens, eval={"every": 2}), progress=False)
    assert not base.objective.fused  # the micro vocabulary (256) is short
    monkeypatch.setattr(distill.objectives.kd, "FUSED_MIN_VOCAB", 256)
    kernels = Trainer(_config(micro, tmp_path / "kernels", tokens=tokens, eval={"every": 2}, attention="cascade"),
                      progress=False)
    assert kernels.objective.fused
    assert kernels.student.lm.config._attn_implementation == "cascade"
    base.train()
    kernels.train()
    a = read_metrics(tmp_path / "base" / "metrics.jsonl")
    b = read_metrics(tmp_path / "kernels" / "metrics.jsonl")
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for x, y in zip(a, b, strict=True):
        for key in ("loss", "kd", "val_kl", "val_ce"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-6), (key, x["step"])


def test_bf16_head_products_need_the_fused_loss(micro, tmp_path):
    bf16_head = {"head_matmul": "bfloat16"}
    with pytest.raises(ValueError, match=r"loss\.head_matmul: bfloat16 needs the fused loss"):
        Trainer(_config(micro, tmp_path / "a", loss=bf16_head, fused_loss="off"), progress=False)
    trainer = Trainer(_config(micro, tmp_path / "b", loss=bf16_head, fused_loss="on", tokens=32 * 4 * 2),
                      progress=False)
    first = trainer.train()
    assert trainer.objective.fused and math.isfinite(first["val_kl"])


def test_a_mistral_vocabulary_trains_with_the_fused_loss_by_default(micro, tmp_path):
    """tiny-mistral has the 131k Tekken vocabulary: `fused_loss: auto` picks the fused loss, and its run equals
    the chunked loss's."""
    from models.prepare import prepare
    from models.registry import get_model

    checkpoint = str(prepare(get_model("tiny-mistral")))  # into this module's CASCADE_HOME
    runs = {}
    for fused in ("auto", "off"):
        config = _config(micro, tmp_path / fused, student=checkpoint, teacher=checkpoint, random_init=True,
                         tokens=32 * 4 * 3, eval={"every": 3}, fused_loss=fused)
        trainer = Trainer(config, progress=False)
        assert trainer.objective.fused == (fused == "auto")
        trainer.train()
        runs[fused] = read_metrics(tmp_path / fused / "metrics.jsonl")
    for x, y in zip(runs["auto"], runs["off"], strict=True):
        for key in ("loss", "val_kl"):
            if key in x:
                assert x[key] == pytest.approx(y[key], rel=1e-4), (key, x["step"])


def test_resume_refuses_a_checkpoint_written_with_other_settings(micro, tmp_path):
    config = _config(micro, tmp_path / "run", tokens=32 * 4 * 4, checkpoint={"every": 2})
    Trainer(config, progress=False).train()
    for change in ({"tokens": 32 * 4 * 8}, {"optim": {"lr": 1e-3}}, {"loss": {"divergence": "reverse_kl"}}):
        changed = TrainConfig.model_validate({**config.model_dump(), **change})
        with pytest.raises(CheckpointMismatchError, match=f"{next(iter(change))} differ.*delete"):
            Trainer(changed, progress=False).train(resume=True)
    # a checkpoint from before a setting existed resumes while that setting keeps its default, not when it is set
    last = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))[-1] / "state.json"
    state = json.loads(last.read_text())
    del state["config"]["loss"]["head_matmul"]
    last.write_text(json.dumps(state))
    assert Trainer(config, progress=False).train(resume=True)["val_kl"] > 0
    bf16_head = TrainConfig.model_validate({**config.model_dump(), "loss": {"head_matmul": "bfloat16"},
                                            "fused_loss": "on"})
    with pytest.raises(CheckpointMismatchError, match=r"\(loss differ"):
        Trainer(bf16_head, progress=False).train(resume=True)
    # where and how often it writes may change; the finished run is found and evaluated, not retrained
    moved = TrainConfig.model_validate({**config.model_dump(), "eval": {"every": 3}, "checkpoint": {"every": 1}})
    assert Trainer(moved, progress=False).train(resume=True) == Trainer(config, progress=False).train(resume=True)
    # the same path with other weights in it (e.g. pruned again) is another start
    (micro["student"] / "model.safetensors").touch()
    with pytest.raises(CheckpointMismatchError, match="the weights in"):
        Trainer(config, progress=False).train(resume=True)


def test_cli_reports_a_nan_teacher_in_one_line(micro, tmp_path):
    from distill.model_io import load_model, save_model

    bad = load_model(micro["teacher"])
    with torch.no_grad():
        bad.model.norm.weight.fill_(float("nan"))
    save_model(bad, tmp_path / "nan-teacher", micro["teacher"])
    config = _write(_config(micro, tmp_path / "run", teacher=str(tmp_path / "nan-teacher")), tmp_path / "c.yaml")
    proc = _cli(["train", str(config)])
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1
    assert "error: loss is nan at step 0" in err and "Traceback" not in err


def test_bad_train_config_is_one_line(micro, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"student": str(micro["student"]), "out_dir": str(tmp_path), "tokens": 10,
                                      "data": {"sources": [{"kind": "files", "paths": ["x"]}]}, "learning_rate": 1}))
    proc = _cli(["train", str(config)])
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "learning_rate" in err and "Traceback" not in err


@pytest.mark.parametrize("tied", [True, False])
def test_two_gloo_processes_with_fsdp2_match_one_process(micro, tmp_path, tied):
    """2 ranks x batch 2 read the same rows per step as 1 rank x batch 2 x 2 accumulation steps. The FSDP run uses
    the fused loss (its head gradient made in the forward must reach the sharded head), the single one the
    chunked loss. Untied, the embedding is an FSDP unit of its own (gathered for its lookup and gradient only), and
    the teacher is held in bf16 (an fp32 student and a bf16 teacher sharded over the same ranks)."""
    teacher_dtype = "float32" if tied else "bfloat16"
    if not tied:
        micro = micro_pair(tmp_path / "untied", tied=False)
    single = _write(_config(micro, tmp_path / "single", batch_size=2, grad_accum=2, tokens=32 * 4 * 12,
                            checkpoint={"every": 6}, teacher_dtype=teacher_dtype), tmp_path / "single.yaml")
    fsdp = _write(_config(micro, tmp_path / "fsdp", batch_size=2, grad_accum=1, tokens=32 * 4 * 12,
                          checkpoint={"every": 6}, fused_loss="on", teacher_dtype=teacher_dtype),
                  tmp_path / "fsdp.yaml")
    one = _cli(["train", str(single)])
    assert one.wait(timeout=300) == 0, one.stderr.read()
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "distill", "train", str(fsdp)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    units = "2 layers, the embedding, the root" if not tied else "2 layers, the root"
    assert f"FSDP2 over 2 ranks; the student's units: {units}" in two.stderr, two.stderr[-3000:]
    a = read_metrics(tmp_path / "single" / "metrics.jsonl")
    b = read_metrics(tmp_path / "fsdp" / "metrics.jsonl")
    assert len(a) == len(b) == 13
    for x, y in zip(a[1:], b[1:], strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4)
    assert a[-1]["val_kl"] == pytest.approx(b[-1]["val_kl"], rel=1e-4)
    assert a[-1]["loss"] < a[1]["loss"]
    # the FSDP checkpoint is a full state dict that a single process can resume from
    state = json.loads((tmp_path / "fsdp" / "checkpoints" / "step-000012" / "state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 12


def test_a_bf16_teacher_holds_half_the_memory_and_distils_alike(micro, tmp_path):
    runs, held = {}, {}
    for dtype in ("float32", "bfloat16"):
        trainer = Trainer(_config(micro, tmp_path / dtype, tokens=32 * 4 * 6, teacher_dtype=dtype), progress=False)
        teacher = trainer.objective.teacher
        assert {p.dtype for p in teacher.parameters()} == {getattr(torch, dtype)}
        assert {p.dtype for p in trainer.student.parameters()} == {torch.float32}  # the student trains in fp32
        assert trainer.evaluator.teacher is teacher  # evaluation reuses it
        held[dtype] = sum(p.numel() * p.element_size() for p in teacher.parameters())
        trainer.train()
        runs[dtype] = read_metrics(tmp_path / dtype / "metrics.jsonl")
    assert held["bfloat16"] * 2 == held["float32"]
    # bf16 rounding of the teacher's weights and hidden states moves the KL target a little (measured <= 0.12%), not
    # the run
    assert runs["bfloat16"][0]["val_kl"] != runs["float32"][0]["val_kl"]
    for x, y in zip(runs["float32"], runs["bfloat16"], strict=True):
        for key in ("loss", "val_kl"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=0.01), (x["step"], key)
    assert runs["bfloat16"][-1]["val_kl"] < runs["bfloat16"][0]["val_kl"]


def test_activation_checkpointing_changes_memory_not_results(micro, tmp_path):
    runs = {}
    for on in (False, True):
        config = _config(micro, tmp_path / str(on), tokens=32 * 4 * 4, activation_checkpointing=on)
        trainer = Trainer(config, progress=False)
        assert trainer.student.lm.model.gradient_checkpointing is on
        trainer.train()
        runs[on] = read_metrics(tmp_path / str(on) / "metrics.jsonl")
    for x, y in zip(runs[False][1:], runs[True][1:], strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6) and x["grad_norm"] == pytest.approx(y["grad_norm"],
                                                                                                 rel=1e-5)


def test_an_offline_teacher_cache_is_built_once_and_reused(micro, tmp_path):
    from distill.teacher_cache import CACHE_FILE

    config = _config(micro, tmp_path / "cached", teacher_top_k=128, tokens=32 * 4 * 20)
    trainer = Trainer(config, progress=False)
    assert trainer.objective.teacher is None and trainer.objective.cache is not None  # no live teacher in a step
    final = trainer.train()
    first = read_metrics(tmp_path / "cached" / "metrics.jsonl")
    assert final["val_kl"] < 0.7 * first[0]["val_kl"]  # evaluated with the full-vocabulary KL
    cache_file = trainer.objective.cache.folder / CACHE_FILE
    built = cache_file.stat().st_mtime_ns
    rows = len(trainer.objective.cache.position)
    assert rows == len({int(i) for s in range(20) for i in trainer.sampler.indices(s, 0)})

    again = Trainer(config.model_copy(update={"out_dir": str(tmp_path / "again")}), progress=False)
    assert cache_file.stat().st_mtime_ns == built and len(again.objective.cache.position) == rows  # nothing recomputed
    longer = Trainer(config.model_copy(update={"out_dir": str(tmp_path / "longer"), "tokens": 32 * 4 * 30}),
                     progress=False)
    assert len(longer.objective.cache.position) > rows  # only the missing rows were added

    live = Trainer(_config(micro, tmp_path / "live", tokens=32 * 4 * 20), progress=False).train()
    assert abs(final["val_kl"] - live["val_kl"]) < 0.25 * live["val_kl"]  # top-128 of 384 tokens: close to live KD


def test_a_cascade_stage_runs_under_torchrun(micro, tmp_path):
    """Rank 0 calibrates and prunes, both ranks train the sharded student, rank 0 exports and registers it."""
    from distill.model_io import load_model
    from models.registry import get_model

    recipe = {
        "name": "micro-fsdp", "parent": str(micro["teacher"]),
        "data": {"sources": [{"kind": "files", "paths": [str(micro["corpus"] / "*.py")]}], "seq_len": 32,
                 "val_sequences": 8},
        "calibration_sequences": 8,
        "train": {"batch_size": 2, "eval": {"every": 3}, "checkpoint": {"every": 3}, "precision": "float32",
                  "optim": {"lr": 3e-3}},
        "stages": [{"name": "micro-fsdp-a", "target": {"dims": {"num_hidden_layers": 2}}, "tokens": 32 * 4 * 6}],
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "distill", "cascade",
                           str(path), "--runs", str(tmp_path / "runs")], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    spec = get_model("micro-fsdp-a")
    card = json.loads((spec.path / "cascade-card.json").read_text())
    assert card["tokens_seen"] == 32 * 4 * 6 and math.isfinite(card["final"]["val_kl"])
    model = load_model(spec.path)
    assert model.config.num_hidden_layers == 2
    last = tmp_path / "runs" / "micro-fsdp-a" / "train" / "checkpoints" / "step-000006"
    assert json.loads((last / "state.json").read_text())["world_size"] == 2
    trained = load_file(last / "model.safetensors")  # the exported student is the trained, gathered one
    exported = model.state_dict()
    assert trained.keys() == {f"lm.{k}" for k in exported if k != "lm_head.weight"}
    assert all(torch.equal(trained[f"lm.{k}"], v) for k, v in exported.items() if k != "lm_head.weight")
    pruned = load_model(tmp_path / "runs" / "micro-fsdp-a" / "pruned")
    assert not torch.equal(pruned.model.norm.weight, model.model.norm.weight)


def test_a_teacher_with_another_tokenizer_is_refused(micro, tmp_path):
    other_corpus = tmp_path / "other"
    other_corpus.mkdir()
    (other_corpus / "one.py").write_text((micro["corpus"] / "textwrap.py").read_text())
    stranger = write_micro_checkpoint(tmp_path / "stranger", other_corpus, seed=5)
    with pytest.raises(VocabMismatchError, match=r"tokenizers differ: id \d+ is"):
        Trainer(_config(micro, tmp_path / "run", teacher=str(stranger)), progress=False)
    with pytest.raises(VocabMismatchError, match="tokenizers differ"):
        Trainer(_config(micro, tmp_path / "run", teacher=str(stranger), teacher_top_k=8), progress=False)
