"""Distillation across nodes, as two "nodes" on one machine: two torchrun launchers (--nnodes 2, one process
each) meeting through c10d rendezvous on 127.0.0.1, gloo, FSDP2, sharded (torch.distributed.checkpoint)
checkpoints. The run equals the one-process run; killing one node and restarting both resumes; a sharded
checkpoint resumes in one process (another world size) and ends where the others do."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distill.components.checkpointer import DCP_METADATA, Checkpointer, CheckpointMismatchError
from distill.components.metrics import read_metrics
from distill.train import Trainer
from models.checkpoint import COMPLETE_MARKER
from serve.launch import free_port
from tests.test_distill_train import ROOT, _config, _write, micro  # noqa: F401  (micro: the shared fixture)

STEPS = 24
TOKENS = 32 * 4 * STEPS  # seq 32 x 4 sequences a step (2 nodes x batch 2, or 1 process x batch 2 x 2 micro-batches)


def _node(config: Path, port: int, log: Path, resume: bool) -> subprocess.Popen:
    """One "node": its own torchrun launcher (agent + one worker)."""
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
           f"127.0.0.1:{port}", "--rdzv-id", f"test-{port}", "--max-restarts", "0",
           "-m", "distill", "train", str(config), *(["--resume"] if resume else [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log.open("ab") as out:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def _kill(node: subprocess.Popen) -> None:
    """The launcher and its worker (torchrun starts workers in their own sessions): a machine gone."""
    import psutil

    tree = [psutil.Process(node.pid), *psutil.Process(node.pid).children(recursive=True)]
    for proc in tree:
        proc.send_signal(signal.SIGKILL)
    node.wait()


@pytest.fixture(scope="module")
def runs(micro: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:  # noqa: F811
    tmp = tmp_path_factory.mktemp("multinode")
    single = _write(_config(micro, tmp / "single", batch_size=2, grad_accum=2, tokens=TOKENS,
                            checkpoint={"every": 8, "format": "full"}), tmp / "single.yaml")
    one = subprocess.run([sys.executable, "-m", "distill", "train", str(single)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr[-3000:]

    two = _write(_config(micro, tmp / "two", batch_size=2, grad_accum=1, tokens=TOKENS,
                         checkpoint={"every": 8, "format": "sharded", "keep": 3}), tmp / "two.yaml")
    port, log = free_port(), tmp / "two.log"
    nodes = [_node(two, port, log, resume=False) for _ in range(2)]
    marker = tmp / "two" / "checkpoints" / "step-000008" / COMPLETE_MARKER
    deadline = time.monotonic() + 300
    while not marker.exists() and all(n.poll() is None for n in nodes) and time.monotonic() < deadline:
        time.sleep(0.01)
    _kill(nodes[1])
    try:  # the surviving node's worker loses its peer mid-collective: it fails, and its launcher exits
        survivor = nodes[0].wait(timeout=120)
    except subprocess.TimeoutExpired:
        _kill(nodes[0])
        survivor = None
    steps_before = read_metrics(tmp / "two" / "metrics.jsonl")[-1]["step"]
    assert 8 <= steps_before < STEPS, f"the run was not killed mid-way:\n{log.read_text()[-3000:]}"

    port = free_port()  # a new rendezvous: both nodes restarted
    nodes = [_node(two, port, log, resume=True) for _ in range(2)]
    codes = [n.wait(timeout=600) for n in nodes]
    assert codes == [0, 0], log.read_text()[-4000:]
    return {"tmp": tmp, "single": tmp / "single", "two": tmp / "two", "two_yaml": two, "log": log,
            "steps_before": steps_before, "survivor": survivor}


def test_two_nodes_equal_one_process_after_a_node_died_and_both_restarted(runs: dict) -> None:
    a = read_metrics(runs["single"] / "metrics.jsonl")
    b = read_metrics(runs["two"] / "metrics.jsonl")
    assert [m["step"] for m in b] == [m["step"] for m in a] == list(range(STEPS + 1))  # resumed, no duplicates
    for x, y in zip(a[1:], b[1:], strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4)  # float noise: sums in another order
    assert a[-1]["val_kl"] == pytest.approx(b[-1]["val_kl"], rel=1e-4)
    assert a[-1]["loss"] < a[1]["loss"]
    last = runs["two"] / "checkpoints" / f"step-{STEPS:06d}"
    assert (last / DCP_METADATA).is_file() and not (last / "model.safetensors").exists()  # shards, not gathered
    state = Checkpointer.state(last)
    assert state["world_size"] == 2 and state["format"] == "sharded"
    assert "resumed from" in runs["log"].read_text()
    assert runs["survivor"] not in (None, 0)  # the surviving node failed by itself (gloo lost its peer), no hang


def test_a_two_node_sharded_checkpoint_resumes_in_one_process(runs: dict) -> None:
    out = runs["tmp"] / "regrown"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(runs["two"] / "checkpoints" / "step-000016", out / "checkpoints" / "step-000016")
    shutil.copy(runs["two"] / "metrics.jsonl", out / "metrics.jsonl")
    config = _config_like(runs, out, grad_accum=2)  # 1 process x 2 x 2 = 2 nodes x 2 x 1 sequences a step
    final = Trainer(config, progress=False).train(resume=True)
    single = read_metrics(runs["single"] / "metrics.jsonl")
    assert final["val_kl"] == pytest.approx(single[-1]["val_kl"], rel=1e-4)
    assert read_metrics(out / "metrics.jsonl")[-1]["step"] == STEPS

    wrong = _config_like(runs, runs["tmp"] / "wrong", grad_accum=1)  # half the global batch: other rows a step
    shutil.copytree(out / "checkpoints" / "step-000016", runs["tmp"] / "wrong" / "checkpoints" / "step-000016")
    with pytest.raises(CheckpointMismatchError, match=r"2 process\(es\) with 4 sequences a step.*= 2: set grad_accum"):
        Trainer(wrong, progress=False).train(resume=True)


def _config_like(runs: dict, out: Path, grad_accum: int):
    from distill.config import TrainConfig, read_yaml

    values = read_yaml(runs["two_yaml"], ValueError)
    return TrainConfig.model_validate({**values, "out_dir": str(out), "grad_accum": grad_accum})
