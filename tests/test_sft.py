"""SFT on chat data: assistant-only masks on real HF and Mistral templates, packing that keeps conversations apart,
normalisation by the step's assistant tokens, the SFT+KD loss against its formula, recipes from the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from distill.arithmetic import answered_somewhere, correct, first_number, problems
from distill.chat_data import ChatDataConfig, Example, build_chat_tokens, pack, render_conversation
from distill.components.metrics import read_metrics
from distill.components.models import Student, Teacher
from distill.config import TrainConfig
from distill.data import DataError, TokenRows
from distill.train import Trainer
from kernels.distill_loss import IGNORE_INDEX
from models.registry import get_model
from models.tokenizers import load_tokenizer
from tests.distill_micro import chat_micro_pair, micro_model

ROOT = Path(__file__).resolve().parents[1]

CONVERSATION = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4.", "reasoning": "two and two"},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6."}]}
WITH_TOOLS = {
    "tools": [{"type": "function", "function": {"name": "add", "description": "add numbers", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}],
    "messages": [
        {"role": "user", "content": "add 2 and 5"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_abcdefghi", "type": "function", "function": {
            "name": "add", "arguments": "{\"a\": 2, \"b\": 5}"}}]},
        {"role": "tool", "tool_call_id": "call_abcdefghi", "content": "7"},
        {"role": "assistant", "content": "It is 7."}]}


def _spans(example: Example) -> list[list[int]]:
    """The runs of target tokens, in order."""
    return _runs(example.ids, example.targets)


def _runs(tokens: list[int], keep: list[bool]) -> list[list[int]]:
    spans: list[list[int]] = []
    previous = False
    for token, target in zip(tokens, keep, strict=True):
        if target and not previous:
            spans.append([])
        if target:
            spans[-1].append(token)
        previous = target
    return spans


def test_hf_template_trains_each_answer_with_its_end_of_turn(smollm2):
    tok = load_tokenizer(smollm2)
    [example] = render_conversation(CONVERSATION, smollm2, tok)
    # SmolLM2's template drops reasoning: it is written into the answer between <think> tags instead
    assert [tok.decode(s) for s in _spans(example)] == ["<think>\ntwo and two\n</think>\n\n4.<|im_end|>\n",
                                                        "6.<|im_end|>\n"]
    assert example.ids == tok.encode_conversation(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
         {"role": "assistant", "content": "<think>\ntwo and two\n</think>\n\n4."},
         {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6."}])
    [tools] = render_conversation(WITH_TOOLS, smollm2, tok)
    call, answer = (tok.decode(s) for s in _spans(tools))
    assert call.startswith("<tool_call>\n") and '"arguments": {"a": 2, "b": 5}' in call
    assert answer == "It is 7.<|im_end|>\n"
    assert "add numbers" in tok.decode(tools.ids) and "add numbers" not in call  # tools in the prompt, not trained


def test_mistral_templates_train_the_answers_and_their_eos(tiny_mistral, tiny_ministral3):
    for spec in (tiny_mistral, tiny_ministral3):
        tok = load_tokenizer(spec)
        examples = render_conversation(CONVERSATION, spec, tok)
        answers = [s for ex in examples for s in _spans(ex)]
        assert answers[-1][-1] == tok.eos_token_id and tok.decode(answers[-1]) == "6."
        user_text = tok.encode("What is 2+2?", add_special_tokens=False)
        assert all(not set(user_text) <= set(s) for s in answers)
    # the old Mistral format moves the system prompt to the last user turn: each answer becomes its own example
    assert len(render_conversation(CONVERSATION, tiny_mistral, load_tokenizer(tiny_mistral))) == 2
    tok = load_tokenizer(tiny_ministral3)  # a [THINK] tokenizer renders the reasoning itself, as special tokens
    [example] = render_conversation(CONVERSATION, tiny_ministral3, tok)
    think = tok.encode_piece("[THINK]")
    assert len(think) == 1 and think[0] in _spans(example)[0]


@pytest.mark.parametrize(("record", "message"), [
    ({"messages": [{"role": "user", "content": "hi"}]}, "must end with an assistant message"),
    ({"messages": []}, "non-empty 'messages' list"),
    ({"text": "hi"}, "non-empty 'messages' list"),
    ({"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]}, "messages.0"),
])
def test_bad_records_are_refused_with_the_reason(smollm2, record, message):
    with pytest.raises(DataError, match=message):
        render_conversation(record, smollm2, load_tokenizer(smollm2))


def test_packing_keeps_conversations_whole_and_apart():
    a = Example([1, 2, 3, 4, 5], [False, False, True, True, True])
    b = Example([6, 7, 8], [False, True, True])
    long = Example(list(range(10, 30)), [False] * 5 + [True] * 15)
    ids, targets, positions, counts = pack([a, b, long], seq_len=10, pad_id=0, packing=True)
    assert ids[0].tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 0, 0] and positions[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1]
    assert targets[0].tolist() == [False, False, True, True, True, False, True, True, False, False]
    assert ids[1].tolist() == list(range(10, 20)) and counts["cut"] == 1  # too long: cut, alone in its row
    ids, _, _, _ = pack([a, b], seq_len=10, pad_id=0, packing=False)
    assert len(ids) == 2  # one conversation per row

    # block-diagonal attention from the restarting positions: a packed row computes what each conversation alone does
    student = Student(micro_model(vocab_size=64).float())
    row = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    together = student(row, positions=torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2]]))
    first, second = student(row[:, :5]), student(row[:, 5:])
    torch.testing.assert_close(together[0, :4], first[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(together[0, 5:], second[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(student(row)[0, 5:], second[0], atol=1e-3)  # without the positions they would mix


@pytest.fixture(scope="module")
def micro_chat(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _micro_chat(tmp_path_factory.mktemp("sft"))


def _micro_chat(base: Path, **overrides: object) -> dict[str, Path]:
    """Micro teacher and student with a chat template, and arithmetic conversations of uneven answer lengths."""
    micro = chat_micro_pair(base, **overrides)
    lines = []
    for n, p in enumerate(problems("train") + problems("heldout")):
        answer = str(p.answer) if n % 3 else f"{p.a} {p.op} {p.b} is {p.answer}."
        lines.append(json.dumps(p.conversation(answer)))
    (micro["corpus"] / "chat.jsonl").write_text("\n".join(lines) + "\n")
    return micro


@pytest.fixture
def sft_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The micro runs' data and models stay out of the real CASCADE_HOME (the real models' tests need it)."""
    monkeypatch.setenv("CASCADE_HOME", str(tmp_path_factory.getbasetemp() / "sft-home"))


def _config(micro: dict[str, Path], out: Path, **overrides: object) -> TrainConfig:
    values: dict[str, object] = dict(
        objective="sft", student=str(micro["student"]), teacher=str(micro["teacher"]), out_dir=str(out),
        data={"format": "chat", "paths": [str(micro["corpus"] / "chat.jsonl")], "seq_len": 64, "val_conversations": 20},
        tokens=64 * 4 * 12, batch_size=4, eval={"every": 6}, checkpoint={"every": 6}, precision="float32",
        optim={"lr": 3e-3, "warmup_fraction": 0.1})
    values.update(overrides)
    return TrainConfig.model_validate(values)


@pytest.mark.usefixtures("sft_home")
def test_chat_rows_hold_whole_conversations_and_only_answers_train(micro_chat):
    config = ChatDataConfig(format="chat", paths=[str(micro_chat["corpus"] / "chat.jsonl")], seq_len=64,
                            val_conversations=20)
    shards = build_chat_tokens(config, micro_chat["student"])
    tok = load_tokenizer(get_model(str(micro_chat["student"])))
    answers = {json.loads(line)["messages"][-1]["content"] + "<|endoftext|>\n"
               for line in (micro_chat["corpus"] / "chat.jsonl").read_text().splitlines()}
    rows = TokenRows(shards["train"], shards["train_targets"], shards["train_positions"])
    batch = rows.batch(torch.arange(len(rows)), torch.device("cpu"))
    live = (batch.labels != IGNORE_INDEX).view(len(rows), -1)  # [N, T-1]: position t predicts token t+1
    labels = batch.labels.view(len(rows), -1)
    spans = 0
    for r in range(len(rows)):
        for span in _runs(labels[r].tolist(), live[r].tolist()):
            assert tok.decode(span) in answers  # exactly an answer and its end of turn: no shift, nothing else
            spans += 1
    assert spans == 300 - 20 and (batch.positions == 0).sum() >= spans  # every training conversation, one each
    assert shards["val"].shape[1] == 64 and len(shards["val"]) < 20  # 20 short conversations packed into fewer rows
    assert build_chat_tokens(config, micro_chat["student"])["train"].equal(shards["train"])  # cached


@pytest.mark.usefixtures("sft_home")
def test_gradient_accumulation_equals_one_big_batch(micro_chat, tmp_path):
    """Micro-batches with different numbers of answer tokens: the step's gradient is the one big batch's."""
    one = Trainer(_config(micro_chat, tmp_path / "one", batch_size=4, grad_accum=1), progress=False)
    two = Trainer(_config(micro_chat, tmp_path / "two", batch_size=2, grad_accum=2), progress=False)
    counts = [int((two.train_data.batch(two.sampler.indices(0, m), torch.device("cpu")).labels != IGNORE_INDEX).sum())
              for m in range(2)]
    assert counts[0] != counts[1]  # else per-micro-batch normalisation would agree too
    means = [trainer._forward_backward() for trainer in (one, two)]
    assert means[0]["loss"] == pytest.approx(means[1]["loss"], rel=1e-6)
    for (name, a), (_, b) in zip(one.student.named_parameters(), two.student.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.usefixtures("sft_home")
def test_sft_with_a_teacher_is_the_mixed_loss_on_answer_tokens(micro_chat, tmp_path):
    a = 0.3
    trainer = Trainer(_config(micro_chat, tmp_path / "run", sft={"teacher_weight": a}), progress=False)
    batch = trainer.train_data.batch(trainer.sampler.indices(0, 0), torch.device("cpu"))
    loss, metrics = trainer.objective(trainer.student, batch, 0)
    teacher = Teacher(trainer.objective.teacher.lm)
    with torch.no_grad():
        s = trainer.student(batch.ids, positions=batch.positions).flatten(0, 1).double().log_softmax(-1)
        t = teacher.logits(batch.ids, batch.positions).flatten(0, 1).double().log_softmax(-1)
    live = batch.labels != IGNORE_INDEX
    ce = -s[live].gather(-1, batch.labels[live, None])[:, 0]
    kl = (t[live].exp() * (t[live] - s[live])).sum(-1)
    assert metrics["tokens"] == live.sum()
    assert loss.item() == pytest.approx(((1 - a) * ce + a * kl).mean().item(), rel=1e-5)
    assert metrics["ce"].item() == pytest.approx(ce.mean().item(), rel=1e-5)


@pytest.mark.usefixtures("sft_home")
def test_sft_lowers_answer_loss_and_kl(micro_chat, tmp_path):
    trainer = Trainer(_config(micro_chat, tmp_path / "run"), progress=False)
    final = trainer.train()
    first = read_metrics(tmp_path / "run" / "metrics.jsonl")[0]
    assert final["val_kl"] < 0.8 * first["val_kl"] and final["val_ce"] < first["val_ce"]


@pytest.mark.parametrize(("overrides", "message"), [
    ({"data": {"sources": [{"kind": "shakespeare"}]}}, "needs data.format: chat"),
    ({"teacher": None, "sft": {"teacher_weight": 0.5}}, "distilling needs a teacher"),
    ({"loss": {"ce_weight": 1.0}}, "set that instead"),
    ({"objective": "gkd"}, "with chat data use sft or kd"),
    ({"objective": "kd", "sft": {"teacher_weight": 0.5}}, "the sft section is for objective sft"),
    ({"data": {"format": "chat"}}, "give paths"),
])
def test_bad_sft_settings_name_the_problem(micro_chat, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        _config(micro_chat, tmp_path, **overrides)


def _cli(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CASCADE_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "distill", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def test_sft_recipe_trains_registers_and_is_not_redone(micro_chat, tmp_path):
    home = tmp_path / "home"
    recipe = {"name": "micro-sft", "model": str(micro_chat["student"]), "teacher": str(micro_chat["teacher"]),
              "data": {"paths": [str(micro_chat["corpus"] / "chat.jsonl")], "seq_len": 64, "val_conversations": 20},
              "epochs": 0.5, "train": {"batch_size": 4, "precision": "float32", "sft": {"teacher_weight": 0.5},
                                       "eval": {"every": 5}, "checkpoint": {"every": 5}}}
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(recipe))
    done = _cli("sft", str(path), home=home)
    assert done.returncode == 0, done.stderr
    card = json.loads((home / "models" / "micro-sft" / "cascade-card.json").read_text())
    assert card["final"]["val_kl"] < card["before"]["val_kl"] and card["teacher_weight"] == 0.5
    assert json.loads((home / "registry" / "micro-sft.json").read_text())["path"] == str(home / "models" / "micro-sft")
    again = _cli("sft", str(path), home=home)
    assert again.returncode == 0 and "already done" in again.stdout

    recipe["train"]["objective"] = "kd"
    path.write_text(yaml.safe_dump(recipe))
    wrong = _cli("sft", str(path), home=home)
    assert wrong.returncode == 2 and "this command runs sft" in wrong.stderr and "Traceback" not in wrong.stderr
    recipe["train"] = {"sft": {"teacher_weight": 2}}
    path.write_text(yaml.safe_dump(recipe))
    bad = _cli("sft", str(path), home=home)
    assert bad.returncode == 2 and "train.sft.teacher_weight" in bad.stderr and "Traceback" not in bad.stderr
    recipe["train"] = {"sft": {"teacher_weight": 0.5}}
    recipe["teacher"] = None
    path.write_text(yaml.safe_dump(recipe))
    bad = _cli("sft", str(path), "--dry-run", home=home)
    assert bad.returncode == 2 and "distilling needs a teacher" in bad.stderr and "Traceback" not in bad.stderr


def test_arithmetic_task_splits_operand_pairs_and_checks_answers(tmp_path):
    train, held = problems("train"), problems("heldout")
    assert len(train) + len(held) == 300 and not {(p.a, p.op, p.b) for p in train} & {(p.a, p.op, p.b) for p in held}
    p = held[0]
    assert correct(p, f" {p.answer}\nQ: next") and not correct(p, f"{p.answer + 1}") and first_number("none") is None
    sentence = f"{p.a} {p.op} {p.b} equals {p.answer}.\nAnd 99."
    assert answered_somewhere(p, sentence) and not answered_somewhere(p, f"{p.answer}, no: {p.answer + 1}")
    done = _cli("arithmetic", str(tmp_path / "task"), home=tmp_path / "home")
    assert done.returncode == 0, done.stderr
    lines = (tmp_path / "task" / "sft-train.jsonl").read_text().splitlines()
    assert len(lines) == len(train) and json.loads(lines[0]) == train[0].conversation()


GRADS_SCRIPT = """
import sys, torch
from distill.common import close_distributed, init_distributed, is_rank0
from distill.config import TrainConfig
from distill.train import Trainer
init_distributed()
trainer = Trainer(TrainConfig.model_validate_json(open(sys.argv[1]).read()), progress=False)
trainer._forward_backward()
grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
         for n, p in trainer.student.named_parameters()}
if is_rank0():
    torch.save(grads, sys.argv[2])
close_distributed()
"""


@pytest.mark.usefixtures("sft_home")
@pytest.mark.parametrize("tied", [True, False])
def test_two_fsdp2_ranks_give_the_one_process_gradient(micro_chat, tmp_path, tied):
    """2 ranks x batch 2 read the rows of 1 process x 2 micro-batches of 2, with different answer tokens per rank:
    the gradient is the same sum over the step's tokens divided by their total (FSDP2's mean over ranks undone).
    Untied, the input embedding is an FSDP unit of its own: its gradient too must be the one process's."""
    if not tied:
        micro_chat = _micro_chat(tmp_path / "untied", tied=False)
    single = Trainer(_config(micro_chat, tmp_path / "one", batch_size=2, grad_accum=2), progress=False)
    single._forward_backward()
    config = _config(micro_chat, tmp_path / "two", batch_size=2, grad_accum=1)
    (tmp_path / "config.json").write_text(config.model_dump_json())
    (tmp_path / "grads.py").write_text(GRADS_SCRIPT)
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", str(tmp_path / "grads.py"),
                          str(tmp_path / "config.json"), str(tmp_path / "grads.pt")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    grads = torch.load(tmp_path / "grads.pt")
    assert ("lm.lm_head.weight" in grads) is not tied
    for name, p in single.student.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("path", sorted((ROOT / "distill" / "recipes" / "posttrain").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_posttrain_recipes_are_valid(path):
    """Each starts, through the recipes it runs after, from the bundled model or a shipped cascade's student."""
    from distill.cascade import load_recipe
    from distill.posttrain import DATA_FORMAT, load_recipe_chain

    chain = load_recipe_chain(path, None)
    students = {stage.name for cascade in (ROOT / "distill" / "recipes").glob("*.yaml")
                for stage in load_recipe(cascade).stages}
    assert chain[0].model in {"smollm2-135m-instruct", *students}
    assert all(recipe.train.objective in DATA_FORMAT for recipe in chain)


@pytest.mark.usefixtures("sft_home")
def test_lora_trains_the_adapters_only_and_exports_them_merged_and_alone(micro_chat, tmp_path):
    from peft import PeftModel

    from distill.model_io import load_model

    trainer = Trainer(_config(micro_chat, tmp_path / "run", teacher=None, lora={"rank": 4, "alpha": 8},
                              optim={"lr": 1e-2, "warmup_fraction": 0.1}), progress=False)
    frozen = {n: p.detach().clone() for n, p in trainer.student.named_parameters() if not p.requires_grad}
    trainable = [n for n, p in trainer.student.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable) and len(frozen) > len(trainable) // 2
    first = trainer.evaluate()
    final = trainer.train()
    assert final["val_ce"] < first["val_ce"]
    for name, p in trainer.student.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name  # the base never moves
    out = trainer.export(tmp_path / "model")
    assert {f.name for f in (out / "adapter").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    merged = load_model(out)
    assert not any("lora" in k for k in merged.state_dict())  # a plain checkpoint
    ids = trainer.train_data.ids[:2]
    with torch.no_grad():
        trained = trainer.student(ids)
        torch.testing.assert_close(merged(input_ids=ids).logits[:, :-1].float(), trained, rtol=1e-4, atol=1e-4)
        again = PeftModel.from_pretrained(load_model(micro_chat["student"]), out / "adapter")  # peft reads ours
        torch.testing.assert_close(again(input_ids=ids).logits[:, :-1].float(), trained, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(load_model(micro_chat["student"])(input_ids=ids).logits[:, :-1].float(), trained,
                                  atol=1e-3)  # and it did learn something
