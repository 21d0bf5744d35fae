"""A teacher served apart: the session's SmolLM2 vLLM server answers the top-k log-probs of training rows, which
match the checkpoint run here and fill the offline cache a run distils from; bad settings and bad servers fail in
one line."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
import yaml

from distill.answers import EndpointError
from distill.config import TrainConfig
from distill.data import DataConfig, SourceConfig
from distill.served_teacher import ServedTeacher, ServedTeacherError, TeacherServerConfig, _row_topk
from distill.teacher_cache import local_topk
from models.registry import ModelSpec
from models.tokenizers import load_tokenizer
from tests.conftest import RunningServer

MODEL = "smollm2-135m-instruct"
KEY_ENV = "CASCADE_TEST_TEACHER_KEY"
TEXT = ("Now is the winter of our discontent made glorious summer by this sun of York; and all the clouds that "
        "loured upon our house in the deep bosom of the ocean buried. Now are our brows bound with victorious "
        "wreaths, our bruised arms hung up for monuments, our stern alarums changed to merry meetings.")


def _served(server: RunningServer, monkeypatch: pytest.MonkeyPatch, **extra: object) -> TeacherServerConfig:
    monkeypatch.setenv(KEY_ENV, server.api_key or "")
    return TeacherServerConfig(url=server.base_url, model=MODEL, api_key_env=KEY_ENV, **extra)


@pytest.mark.server
def test_served_top_k_matches_the_checkpoint_run_here(vllm_server: RunningServer, smollm2: ModelSpec,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    ids = load_tokenizer(smollm2).encode(TEXT, add_special_tokens=False)
    rows = torch.tensor([ids[:40], ids[20:60]])  # [2, 40]
    vocab, k = 49152, 8
    served = ServedTeacher(_served(vllm_server, monkeypatch, concurrency=2), k, vocab).topk(rows)
    local = local_topk(smollm2.checkpoint_dir, k, 1.0, vocab)(rows)
    for a, b in zip(served, local, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
    s_idx, s_lp, s_tail = served
    l_idx, l_lp, l_tail = local
    # measured: the same top-k ids at all 78 positions and log-probs equal to 4 decimals (vLLM on CPU runs fp32);
    # the bounds leave room for kernels that round differently
    agree = (s_idx[..., 0] == l_idx[..., 0]).float().mean()
    assert agree > 0.95, agree
    assert (s_lp[..., 0] - l_lp[..., 0]).abs().median() < 1e-3
    # each row's k + 1 buckets are a distribution: the top k and the tail sum to 1
    assert torch.allclose(torch.cat([s_lp, s_tail[..., None]], -1).logsumexp(-1), torch.zeros(2, 39), atol=1e-4)
    assert (s_tail - l_tail).abs().median() < 1e-3


@pytest.mark.server
def test_a_run_distils_from_a_served_teacher(vllm_server: RunningServer, smollm2: ModelSpec, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A from-scratch SmolLM2-shaped student learns from the served teacher's top-k; the cache names the server,
    and the run never loads the teacher's weights (no val_kl without an eval_teacher)."""
    from distill.components.metrics import read_metrics
    from distill.train import Trainer

    checkpoint = str(smollm2.checkpoint_dir)  # under the session's CASCADE_HOME, read before it moves
    monkeypatch.setenv("CASCADE_HOME", str(tmp_path / "home"))
    config = TrainConfig(
        student=checkpoint, teacher=checkpoint, out_dir=str(tmp_path / "run"),
        random_init=True, data=DataConfig(sources=[SourceConfig(kind="shakespeare")], seq_len=64, val_sequences=4,
                                          max_train_tokens=20000),
        tokens=64 * 2 * 6, batch_size=2, eval={"every": 6}, checkpoint={"every": 6}, precision="float32",
        optim={"lr": 3e-3, "warmup_fraction": 0.1}, teacher_top_k=16,
        teacher_server=_served(vllm_server, monkeypatch),
    )
    trainer = Trainer(config, progress=False)
    assert trainer.objective.teacher is None and trainer.evaluator.teacher is None
    assert "cached top-k teacher" in trainer.objective.describe()
    about = json.loads((trainer.objective.cache.folder / "cache.json").read_text())
    assert about["served"] == vllm_server.base_url and about["model"] == MODEL and about["k"] == 16
    rows = {int(i) for s in range(6) for i in trainer.sampler.indices(s, 0)}
    assert len(trainer.objective.cache.position) == len(rows)
    trainer.train()
    metrics = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert "val_kl" not in metrics[-1] and metrics[-1]["val_ce"] < metrics[0]["val_ce"]
    assert metrics[-1]["loss"] < metrics[1]["loss"]


def _config(**train: object) -> dict:
    return {"student": "s", "teacher": "t", "out_dir": "o", "tokens": 64,
            "data": {"sources": [{"kind": "shakespeare"}]}, **train}


@pytest.mark.parametrize(("train", "says"), [
    ({"teacher_server": {"url": "http://t:8000", "model": "m"}}, "set teacher_top_k"),
    ({"teacher_server": {"url": "http://t:8000", "model": "m"}, "teacher_top_k": 64}, "at most 20"),
    ({"teacher_server": {"url": "http://t:8000", "model": "m"}, "teacher_top_k": 8, "loss": {"temperature": 2}},
     "temperature 1"),
    ({"teacher_server": {"url": "t:8000", "model": "m"}, "teacher_top_k": 8}, "http(s)://"),
])
def test_served_teacher_settings_are_checked(train: dict, says: str) -> None:
    with pytest.raises(ValueError, match=re.escape(says)):
        TrainConfig.model_validate(_config(**train))


def _answer(*tops: dict[str, float] | None) -> dict:
    return {"choices": [{"logprobs": {"top_logprobs": list(tops)}}]}


def test_a_response_becomes_cache_rows_or_a_clear_error() -> None:
    good = _answer(None, {"token_id:5": -0.1, "token_id:7": -3.0, "token_id:2": -2.5},
                   {"token_id:1": -0.5, "token_id:3": -1.5}, {"token_id:9": -0.2})  # the generated token's: unused
    ids, lp, tail = _row_topk(good, [4, 5, 1], 2, vocab=10)
    assert ids.tolist() == [[5, 2], [1, 3]] and lp.tolist() == [pytest.approx([-0.1, -2.5]), [-0.5, -1.5]]
    assert tail.tolist() == pytest.approx([math.log(1 - math.exp(-0.1) - math.exp(-2.5)),
                                           math.log(1 - math.exp(-0.5) - math.exp(-1.5))], abs=1e-5)
    with pytest.raises(ServedTeacherError, match="token_id:N"):
        _row_topk(_answer(None, {"Paris": -0.1, " Rome": -2.0}), [4, 5], 2, vocab=10)
    with pytest.raises(ServedTeacherError, match="beyond the student's vocabulary"):
        _row_topk(_answer(None, {"token_id:12": -0.1, "token_id:1": -2.0}), [4, 5], 2, vocab=10)
    with pytest.raises(ServedTeacherError, match="--max-logprobs >= 2"):
        _row_topk(_answer(None, {"token_id:1": -0.1}), [4, 5], 2, vocab=10)
    with pytest.raises(ServedTeacherError, match="prompt log-probs"):
        _row_topk(_answer(None), [4, 5, 6], 2, vocab=10)


def test_an_unreachable_teacher_server_is_one_error(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(EndpointError, match=re.escape("cannot reach http://127.0.0.1:9")):
        ServedTeacher(TeacherServerConfig(url="http://127.0.0.1:9", model="m"), 8, 100)
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(ServedTeacherError, match=f"names {KEY_ENV}, which is not set"):
        ServedTeacher(TeacherServerConfig(url="http://127.0.0.1:9", model="m", api_key_env=KEY_ENV), 8, 100)


def test_the_cli_says_when_the_served_teacher_is_down(smollm2: ModelSpec, tmp_path: Path) -> None:
    config = _config(teacher_top_k=8, teacher_server={"url": "http://127.0.0.1:9", "model": MODEL})
    config.update(student=str(smollm2.checkpoint_dir), teacher=str(smollm2.checkpoint_dir),
                  out_dir=str(tmp_path / "run"), data={"sources": [{"kind": "shakespeare"}], "seq_len": 64,
                                                       "val_sequences": 4, "max_train_tokens": 4000})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    out = subprocess.run([sys.executable, "-m", "distill", "train", str(tmp_path / "c.yaml")], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "CASCADE_HOME": str(tmp_path)},
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 2, out.stderr[-2000:]
    assert "cannot reach http://127.0.0.1:9" in out.stderr and "Traceback" not in out.stderr


def test_busy_and_failing_servers_are_retried_and_refusals_are_not(monkeypatch: pytest.MonkeyPatch) -> None:
    """The HTTP boundary faked (tests above use the real server): 429 with an HTTP-date Retry-After, then 503 with
    Retry-After 3, then the answer; a 400 stops at once with the server's message."""
    answers = [httpx.Response(429, headers={"Retry-After": "Wed, 21 Oct 2026 07:28:00 GMT"}),
               httpx.Response(503, headers={"Retry-After": "3"}),
               httpx.Response(200, json=_answer(None, {"token_id:1": -0.1, "token_id:2": -3.0}, None)),
               httpx.Response(400, json={"error": {"message": "prompt too long", "param": "prompt"}})]
    slept: list[float] = []
    monkeypatch.setattr("distill.served_teacher.time.sleep", slept.append)
    teacher = object.__new__(ServedTeacher)
    teacher.config, teacher.k, teacher.vocab = TeacherServerConfig(url="http://t:1", model="m"), 2, 10
    teacher.client = httpx.Client(base_url="http://t:1", transport=httpx.MockTransport(lambda _: answers.pop(0)))
    ids, _, _ = teacher.topk(torch.tensor([[4, 5]]))
    assert ids.tolist() == [[[1, 2]]] and slept == [1.0, 3.0]
    with pytest.raises(ServedTeacherError, match=r"refused a row \(400\): .*prompt too long"):
        teacher.topk(torch.tensor([[4, 5]]))
