"""The post-training comparison with TRL (distill/posttrain_vs_trl.py) compares like with like: on the same rows or
pairs, order, weights and settings, TRL's SFTTrainer and DPOTrainer compute our SFT and DPO losses step after step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distill.arithmetic import preference_pair, problems
from distill.compare_trl import child_result, loop_seconds
from distill.config import TrainConfig
from tests.distill_micro import chat_micro_pair

STEPS = 6


@pytest.fixture(scope="module")
def micro(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    micro = chat_micro_pair(tmp_path_factory.mktemp("posttrain-vs-trl"))
    every = problems("train") + problems("heldout")
    (micro["corpus"] / "chat.jsonl").write_text("".join(
        json.dumps(p.conversation(str(p.answer) if n % 3 else f"{p.a} {p.op} {p.b} is {p.answer}.")) + "\n"
        for n, p in enumerate(every)))
    (micro["corpus"] / "pairs.jsonl").write_text("".join(json.dumps(preference_pair(p)) + "\n" for p in every))
    return micro


def _both(micro: dict[str, Path], kind: str, base: Path) -> dict[str, dict]:
    data = ({"format": "chat", "paths": [str(micro["corpus"] / "chat.jsonl")], "seq_len": 32, "val_conversations": 8}
            if kind == "sft" else
            {"format": "pairs", "paths": [str(micro["corpus"] / "pairs.jsonl")], "seq_len": 32, "val_pairs": 8})
    config = TrainConfig.model_validate(dict(
        objective="sft" if kind == "sft" else "prefer", student=str(micro["student"]), out_dir="unused", data=data,
        tokens=(1 if kind == "sft" else 2) * 32 * 4 * STEPS, batch_size=4, precision="float32",
        eval={"every": 10**9}, checkpoint={"every": 10**9}, optim={"lr": 3e-3, "warmup_fraction": 0.0},
        **({"prefer": {"beta": 0.5}} if kind == "dpo" else {})))
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CASCADE_HOME", str(micro["home"]))
        for which in ("cascade", "trl"):  # each in its own process, as the benchmark runs them
            run = config.model_copy(update={"out_dir": str(base / which / "run")})
            spec = {"config": run.model_dump(mode="json"), "out": str(base / which), "bf16": False}
            out[which] = child_result(which, spec, base / f"{which}.spec.json", "distill.posttrain_vs_trl")
    out["cascade"] |= loop_seconds(base / "cascade" / "run" / "metrics.jsonl")
    return out


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_trl_computes_our_loss_on_the_same_batches(micro, tmp_path, kind):
    runs = _both(micro, kind, tmp_path)
    ours, trl = runs["cascade"]["losses"], runs["trl"]["losses"]
    assert len(ours) == len(trl) == STEPS
    assert trl[0] == pytest.approx(ours[0], abs=2e-4)  # TRL logs 4 decimals
    assert trl == pytest.approx(ours, abs=3e-3)  # and the same optimisation after it
    assert runs["trl"]["tokens"] == runs["cascade"]["tokens"]
    if kind == "sft":  # (six DPO steps on a random micro model go up and down: the equality is the point)
        assert ours[-1] < ours[0]


def test_trl_grpo_trains_on_our_prompts_in_our_order(micro, tmp_path):
    """The GRPO comparison (distill/grpo_vs_trl.py): TRL's GRPOTrainer reads our prompt text in our step order and
    is scored by our verifier (its samples are its own, so losses are not compared; the benchmark compares reward
    curves and held-out accuracy)."""
    from distill.grpo_vs_trl import ordered_prompts
    from distill.objectives.grpo import prompt_end

    config = TrainConfig.model_validate(dict(
        objective="grpo", student=str(micro["student"]), out_dir=str(tmp_path / "unused"),
        data={"format": "chat", "paths": [str(micro["corpus"] / "chat.jsonl")], "seq_len": 32,
              "val_conversations": 8, "packing": False},
        tokens=32 * 4 * 3, batch_size=4, precision="float32", eval={"every": 10**9}, checkpoint={"every": 10**9},
        optim={"lr": 1e-3, "warmup_fraction": 0.0}, grpo={"group_size": 4, "new_tokens": 4}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CASCADE_HOME", str(micro["home"]))
        steps, prompts = ordered_prompts(config)
        from distill.data import BatchSampler, load_splits
        from models.registry import get_model
        from models.tokenizers import load_tokenizer

        rows, _ = load_splits(config.data, config.data_model())
        first = BatchSampler(rows.ids, 4, 1, 1, config.seed).indices(0, 0).tolist()
        tok = load_tokenizer(get_model(config.data_model()))
        assert prompts[:4] == [tok.decode(rows.ids[r, : prompt_end(rows.targets[r])].tolist()) for r in first]
        assert steps == 3 and len(prompts) == 12 and all("What is" in p for p in prompts)
        spec = {"config": config.model_dump(mode="json"), "out": str(tmp_path / "trl")}
        result = child_result("trl", spec, tmp_path / "trl.spec.json", "distill.grpo_vs_trl")
    assert result["steps"] == 3 and len(result["rewards"]) == 3 and all(0 <= r <= 1 for r in result["rewards"])
    assert (tmp_path / "trl" / "student" / "config.json").is_file()
