"""Chat distillation data: the teacher's answers through the real server, resumable, and read back as training text."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from distill.answers import AnswerSettings, read_prompts, write_answers
from distill.data import DataError, file_documents
from models.registry import ModelSpec
from models.tokenizers import load_tokenizer
from tests.conftest import RunningServer

ROOT = Path(__file__).resolve().parents[1]


def _lines(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.server
def test_teacher_answers_are_written_resumed_and_read_as_chat_data(vllm_server: RunningServer, smollm2: ModelSpec,
                                                                   tmp_path: Path) -> None:
    prompts = _lines(tmp_path / "prompts.jsonl", [
        {"prompt": "What is the capital of France?"},
        {"messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a color."}]},
        {"prompt": "Write the number seven in digits."},
    ])
    out = tmp_path / "answers.jsonl"
    # an earlier run was interrupted after answering prompt 2 (and tore its last line): only 1 and 3 are asked
    (tmp_path / "answers.jsonl.partial").write_text(
        json.dumps({"index": 1, "answer": "Blue, from before.", "finish_reason": "stop"}) + "\n{\"index\": 2, \"ans")
    counts = write_answers(prompts, out, vllm_server.base_url, vllm_server.api_key, AnswerSettings(max_tokens=24),
                           progress=False)
    assert counts["answers"] == 3
    assert not (tmp_path / "answers.jsonl.partial").exists()
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["messages"][-1]["role"] for r in records] == ["assistant"] * 3
    assert records[0]["messages"][-1]["content"] == "The capital of France is Paris."  # greedy, as served
    assert records[1]["messages"][-1]["content"] == "Blue, from before."  # kept from the interrupted run
    assert records[1]["messages"][0]["role"] == "system"
    assert records[2]["messages"][-1]["content"] and records[0]["teacher"] == smollm2.name

    # the file is chat training data: the files source renders each conversation with the teacher's chat template
    tokenizer = load_tokenizer(smollm2)
    documents = list(file_documents([str(out)], tokenizer))
    assert len(documents) == 3 and all(isinstance(ids, list) for _, ids in documents)
    text = tokenizer.decode(documents[1][1])
    assert "<|im_start|>system\nAnswer briefly." in text and "<|im_start|>assistant\nBlue, from before." in text


@pytest.mark.parametrize("name", ["tiny-mistral", "smollm2-135m-instruct"])
def test_chat_records_are_finished_conversations(name: str, tmp_path: Path) -> None:
    """Training text ends with the answer closed by EOS, not with the opening of another assistant turn."""
    from models.prepare import prepare
    from models.registry import get_model

    spec = get_model(name)
    prepare(spec)
    tokenizer = load_tokenizer(spec)
    conversation = [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."}]
    path = _lines(tmp_path / "chat.jsonl", [{"messages": conversation}])
    [(_, ids)] = list(file_documents([str(path)], tokenizer))
    assert tokenizer.decode(ids).split("Blue.")[-1].strip() in ("", "<|im_end|>")  # closed, no new turn opened
    assert tokenizer.eos_token_id in ids[-2:]
    assert ids[: len(prompt := tokenizer.encode_chat(conversation[:1]))] == prompt  # the prompt as served


def test_a_reasoning_teachers_thinking_is_training_text_in_its_markers(tmp_path: Path) -> None:
    """The server splits a reasoning model's thinking off its answer; distilling only the answer would teach the
    students to stop thinking. Rendered back between the model's markers, as the model writes it."""
    import dataclasses

    from models.prepare import prepare
    from models.registry import get_model

    spec = get_model("smollm2-135m-instruct")
    prepare(spec)
    think = dataclasses.replace(spec, reasoning_format="think-tags")
    tokenizer = load_tokenizer(think)
    conversation = [{"role": "user", "content": "What is 2 plus 3?"},
                    {"role": "assistant", "content": "5", "reasoning": "2 plus 3 is 5."}]
    path = _lines(tmp_path / "chat.jsonl", [{"messages": conversation}, {"messages": [
        conversation[0], {"role": "assistant", "content": "5"}]}])
    [(_, ids), (_, plain)] = list(file_documents([str(path)], tokenizer, think))
    assert "<|im_start|>assistant\n<think>\n2 plus 3 is 5.\n</think>\n\n5<|im_end|>" in tokenizer.decode(ids)
    assert plain == tokenizer.encode_conversation([conversation[0], {"role": "assistant", "content": "5"}])
    assert ids[: len(prompt := tokenizer.encode_chat(conversation[:1]))] == prompt  # the prompt as served
    with pytest.raises(DataError, match=r"chat.jsonl:1: .*reasoning format"):  # never silently dropped
        list(file_documents([str(path)], tokenizer))


def test_bad_prompt_files_name_the_line(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"p.jsonl:2: a line needs a 'prompt'"):
        read_prompts(_lines(tmp_path / "p.jsonl", [{"prompt": "ok"}, {"text": "no"}]))
    with pytest.raises(DataError, match="last message must be the user's turn"):
        read_prompts(_lines(tmp_path / "p.jsonl", [{"messages": [{"role": "user", "content": "a"},
                                                                 {"role": "assistant", "content": "b"}]}]))
    with pytest.raises(DataError, match="does not exist"):
        read_prompts(tmp_path / "missing.jsonl")


def test_cli_reports_an_unreachable_endpoint_in_one_line(tmp_path: Path) -> None:
    prompts = _lines(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    r = subprocess.run([sys.executable, "-m", "distill", "answers", str(prompts), str(tmp_path / "out.jsonl"),
                        "--endpoint", "http://127.0.0.1:9"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "cannot reach http://127.0.0.1:9" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.server
def test_an_answers_source_is_made_once_checked_for_contamination_and_mixed(vllm_server: RunningServer,
                                                                            smollm2: ModelSpec, tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from distill.corpus import ensure_answers
    from distill.data import DataConfig, SourceConfig, build_tokens

    monkeypatch.setenv("CASCADE_HOME", str(tmp_path / "home"))
    prompts = _lines(tmp_path / "prompts.jsonl", [
        {"prompt": "What is the capital of France?", "family": "knowledge"},
        {"prompt": "Quick one: what is 4 plus 4?", "family": "arithmetic"},  # an eval question whole: dropped
        {"prompt": "Name three colours of the rainbow.", "family": "knowledge"},
    ])
    source = SourceConfig(kind="answers", prompts=str(prompts), teacher=smollm2.name, answer_tokens=24)
    out = ensure_answers(source, progress=False, endpoint=vllm_server.base_url, api_key=vllm_server.api_key)
    card = json.loads((out.parent / "card.json").read_text())
    assert card["prompts"] == 3 and card["contamination"]["prompts_dropped"] == 1 and card["answers"] == 2
    assert card["prompts_by_family"] == {"knowledge": 2} and card["contamination"]["eval_examples"] > 5000
    made = out.stat().st_mtime_ns
    assert ensure_answers(source, endpoint="http://127.0.0.1:9") == out and out.stat().st_mtime_ns == made  # once
    # the filtered file gone (the eval data changed): remade from the teacher's answers already made, no server
    out.unlink()
    assert ensure_answers(source, endpoint="http://127.0.0.1:9") == out and json.loads(
        (out.parent / "card.json").read_text())["answers"] == 2

    # a mixture: the answers and Shakespeare, in proportions set by per-source caps; both give validation text
    data = DataConfig(sources=[source, SourceConfig(kind="shakespeare", max_tokens=3000)], seq_len=16,
                      val_sequences=4)
    tokens = build_tokens(data, smollm2.name)
    from distill.data import cache_key
    from models.registry import cascade_home

    stats = json.loads((cascade_home() / "data" / cache_key(data, smollm2.checkpoint_dir) / "data.json").read_text())
    answers, shakespeare = stats["sources"]
    assert shakespeare["train_tokens"] == 3000 and answers["documents"] == 2 and answers["val_tokens"] >= 1
    assert tokens["train"].numel() == (answers["train_tokens"] + 3000) // 16 * 16
