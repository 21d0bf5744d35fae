"""eval/: task data, scoring, reports, the CLI's errors, and real lm-eval runs through both modes."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from eval.__main__ import main
from eval.humaneval import check_completion
from eval.report import Row, RunReport, comparison_markdown, write_comparison
from eval.server_checks import run_checks, score_reasoning, score_tool_call
from eval.sources import SourceError, convert_bigbench, prepare_files
from eval.suites import SUITES, TASKS_DIR, task_configs
from tests.conftest import REPO, SERVER_START_TIMEOUT, RunningServer

PNG = b"\x89PNG\r\n\x1a\n"


def test_bigbench_multiple_choice_becomes_choices_and_label() -> None:
    rows = convert_bigbench("t", [
        {"input": "What is 1 plus 1?", "target": "2", "target_scores": {"3": 0, "2": 1, "banana": 0}},
        {"input": "I have a cat. How many animals?", "target": ["one", "1"]},
        {"input": "x", "target_scores": {"a": 0.0, "b": 1.0}},
    ])
    assert rows[0] == {"id": 0, "input": "What is 1 plus 1?", "choices": ["3", "2", "banana"], "label": 1,
                       "target": "2", "targets": ["2"]}
    assert rows[1]["targets"] == ["one", "1"] and "choices" not in rows[1]
    assert rows[2]["target"] == "b" and rows[2]["label"] == 1
    with pytest.raises(SourceError, match="neither target nor target_scores"):
        convert_bigbench("t", [{"input": "x"}])


def test_data_names_cannot_leave_the_cache() -> None:
    for bad in ("../escape.jsonl", "/etc/passwd", "bigbench/../../x.jsonl"):
        with pytest.raises(SourceError, match="relative path inside"):
            prepare_files([bad])
    with pytest.raises(SourceError, match="no source makes"):
        prepare_files(["elsewhere/thing.jsonl"])


def test_every_suite_task_loads_with_its_data() -> None:
    """Every YAML parses, names real data and the data has the fields its template uses."""
    names = tuple(sorted({t for s in SUITES.values() for t in s.tasks}))
    assert names == tuple(sorted(p.stem for p in TASKS_DIR.glob("*.yaml")))
    configs = task_configs(tuple(n for n in names if n not in SUITES["bigbench"].tasks))
    try:
        configs += task_configs(SUITES["bigbench"].tasks)
    except SourceError as e:  # the package index no longer serves the sdist: the error says so and what to use
        assert "bigbench==1.0.0" in str(e) and "`abilities` suite" in str(e)
    for config in configs:
        path = Path(config["dataset_kwargs"]["data_files"]["test"])
        first = json.loads(path.open().readline())
        if config.get("output_type") == "multiple_choice":
            assert {"choices", "label"} <= first.keys(), config["task"]
        assert path.is_absolute() and path.stat().st_size > 0, config["task"]


def test_a_changed_generator_remakes_its_data_and_changes_the_suite_digest(tmp_path, monkeypatch) -> None:
    """compare reuses a model's report only while the suite scores the same data (eval.suites.suite_digest)."""
    from eval import generated
    from eval.suites import suite_digest

    monkeypatch.setenv("CASCADE_HOME", str(tmp_path))
    smoke = SUITES["smoke"]
    before = suite_digest(smoke)
    path = prepare_files(["generated/arithmetic_1_digit_addition.jsonl"])["generated/arithmetic_1_digit_addition.jsonl"]
    path.write_text('{"input": "stale"}\n')
    assert suite_digest(smoke) == before and "stale" not in path.read_text()  # remade from its generator
    make = generated.GENERATORS["arithmetic_1_digit_addition"]
    monkeypatch.setitem(generated.GENERATORS, "arithmetic_1_digit_addition", lambda: make()[:50])
    assert suite_digest(smoke) != before


def test_unknown_tasks_are_named() -> None:
    with pytest.raises(SourceError, match="no generated task 'not_a_task'; known: arithmetic_1_digit_addition"):
        prepare_files(["generated/not_a_task.jsonl"])


# sha256 (first 16 hex) of each generated file: the same bytes on every machine, or scores are not comparable
GENERATED_DIGESTS = {
    "arithmetic_1_digit_addition": "0ad50df83d0b7010",
    "arithmetic_2_digit_addition": "a30c0d5d1f12e511",
    "arithmetic_2_digit_multiplication": "4a9d7e1ca0fcd317",
    "unit_conversion": "9406d77623a0d74d",
    "navigate": "d82535f3ad2997f7",
    "object_counting": "a044db831db1297b",
}


def test_generated_tasks_are_fixed_and_right() -> None:
    import hashlib
    import re
    from decimal import Decimal

    from eval.generated import GENERATORS, MOVES, NUMBER_WORDS, PREFIXES, THINGS, _plural

    assert GENERATORS.keys() == GENERATED_DIGESTS.keys()
    for name, make in GENERATORS.items():
        rows = make()
        text = "".join(json.dumps(r) + "\n" for r in rows)
        assert hashlib.sha256(text.encode()).hexdigest()[:16] == GENERATED_DIGESTS[name], name
        assert len({r["input"] for r in rows}) == len(rows), name  # a repeat could be its own few-shot example
        for r in rows:
            assert r["targets"][-1] == r["target"] or name == "object_counting"
            if "choices" in r:
                assert r["choices"][r["label"]] == r["target"] and len(set(r["choices"])) == len(r["choices"])
            if name.startswith("arithmetic"):
                a, op, b = re.fullmatch(r"What is (\d+) (plus|times) (\d+)\?", r["input"]).groups()
                assert int(r["target"]) == (int(a) + int(b) if op == "plus" else int(a) * int(b))
            elif name == "unit_conversion":
                value, src, dst = re.fullmatch(r"([\d.]+) (\w*) expressed in units of (\w*) is", r["input"]).groups()
                unit = src[-1] if src[-1] in "mgLNJWs" else src
                power = PREFIXES[src[: -len(unit)]] - PREFIXES[dst[: -len(unit)]]
                assert Decimal(r["target"].split()[0]) == Decimal(value).scaleb(power)
            elif name == "navigate":
                x = y = 0
                moves = re.findall(r"Take (\d+) steps? (\w+)\.", r["input"])
                assert all(1 <= int(n) <= 9 for n, _ in moves), r  # a 14-step move would only close a path
                for n, d in moves:
                    x, y = x + MOVES[d][0] * int(n), y + MOVES[d][1] * int(n)
                assert r["target"] == ("Yes" if x == y == 0 else "No")
            elif name == "object_counting":
                kind = re.search(r"How many (.+) do I have\?", r["input"]).group(1)
                listing = r["input"].removeprefix("I have ").split(". How")[0]
                items = [i.split(" ", 1) for i in listing.replace(", and ", ", ").replace(" and ", ", ").split(", ")]
                total = sum(1 if n in ("a", "an") else NUMBER_WORDS.index(n) for n, thing in items
                            if any(thing in (t, _plural(t)) for t in THINGS[kind]))
                assert r["targets"] == [NUMBER_WORDS[int(r["target"])], r["target"]] and int(r["target"]) == total, r
    navigate = GENERATORS["navigate"]()
    assert sum(r["label"] == 0 for r in navigate) == len(navigate) // 2


TOOLS = json.loads((TASKS_DIR / "tool_calls.json").read_text())["tools"]


def _call(name: str, arguments: str) -> dict:
    return {"tool_calls": [{"function": {"name": name, "arguments": arguments}}]}


def test_tool_call_scoring() -> None:
    case = {"expected": {"name": "convert_currency",
                         "arguments": {"amount": 100, "from_currency": "USD", "to_currency": "EUR"}}}
    right = _call("convert_currency", '{"amount": 100.0, "from_currency": "usd", "to_currency": " EUR"}')
    assert score_tool_call(case, TOOLS, right) == {"decision_acc": 1, "name_acc": 1, "args_acc": 1, "schema_valid": 1}
    wrong_args = _call("convert_currency", '{"amount": "100", "from_currency": "USD", "to_currency": "EUR"}')
    assert score_tool_call(case, TOOLS, wrong_args) == {"decision_acc": 1, "name_acc": 1, "args_acc": 0,
                                                        "schema_valid": 0}
    extra = _call("convert_currency", '{"amount": 100, "from_currency": "USD", "to_currency": "EUR", "x": 1}')
    assert score_tool_call(case, TOOLS, extra)["args_acc"] == 0
    assert score_tool_call(case, TOOLS, _call("get_weather", '{"city": "Paris"}'))["name_acc"] == 0
    assert score_tool_call(case, TOOLS, _call("convert_currency", "{not json"))["schema_valid"] == 0
    assert score_tool_call(case, TOOLS, {"content": "no call"}) == {"decision_acc": 0, "name_acc": 0, "args_acc": 0,
                                                                    "schema_valid": 0}
    assert score_tool_call({"expected": None}, TOOLS, {"content": "hi"}) == {"decision_acc": 1}
    assert score_tool_call({"expected": None}, TOOLS, right) == {"decision_acc": 0}


def test_reasoning_scoring() -> None:
    case = {"expected": "Paris"}
    good = score_reasoning(case, {"reasoning": "France's capital...", "content": "It is Paris."})
    assert good == {"format_ok": 1, "thinking_present": 1, "answer_after": 1, "no_marker_leak": 1, "answer_correct": 1}
    assert score_reasoning(case, {"content": "Paris"})["format_ok"] == 0  # no thinking
    assert score_reasoning(case, {"reasoning": "hmm", "content": None})["format_ok"] == 0  # never closed
    leaked = score_reasoning(case, {"reasoning": "hmm", "content": "</think> Paris"})
    assert leaked["format_ok"] == 0 and leaked["no_marker_leak"] == 0


def _report(model: str, params: int, scores: dict[str, float]) -> RunReport:
    rows = [Row(task, "acc", v, 0.05, 20, True) for task, v in scores.items()]
    rows.append(Row("t_ppl", "perplexity", 7.0, 1.0, 20, False))
    return RunReport(model, "s", "checkpoint (hf)", params, "2026-12-01T00:00:00+00:00", 20, 1.0, rows)


def test_comparison_report_and_plot(tmp_path: Path) -> None:
    reports = [_report("small", 70_000_000, {"a": 0.25, "b": 0.5}), _report("big", 135_000_000, {"a": 0.5, "b": 1.0})]
    text = comparison_markdown(reports)
    assert "| big | 135.0M | 0.7500 | 0.5000 | 1.0000 |" in text
    assert "| small | 70.0M | 0.3750 |" in text
    assert text.index("| big") < text.index("| small")
    assert "t_ppl" not in text  # lower-is-better metrics are not averaged into quality
    md, png = write_comparison(reports, tmp_path)
    assert md.read_text() == text and png.read_bytes().startswith(PNG)
    again = RunReport.from_json(reports[0].to_json())
    assert again == reports[0]


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "eval", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize(("args", "message"), [
    (("run", "--suite", "no-such-suite"), "unknown suite 'no-such-suite'; known: smoke, abilities, bigbench"),
    (("run", "--suite", "smoke", "--model", "no-such-model"), "unknown model 'no-such-model'; known:"),
    (("run", "--suite", "smoke", "--url", "http://127.0.0.1:9"), "cannot reach the endpoint http://127.0.0.1:9"),
    (("run", "--suite", "tools", "--mode", "checkpoint"), "suite tools checks the server's parsers"),
    (("run", "--suite", "smoke", "--limit", "-1"), "--limit -1"),
    (("prepare", "nope"), "unknown suite 'nope'"),
])
def test_bad_input_is_one_line(args: tuple[str, ...], message: str) -> None:
    r = _cli(*args)
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], r.stderr
    assert "Traceback" not in r.stderr


def test_endpoint_with_the_wrong_model_or_key(vllm_server: RunningServer) -> None:
    r = _cli("run", "--suite", "smoke", "--url", vllm_server.base_url, "--api-key", "wrong")
    assert r.returncode == 2 and "refused the API key (401)" in r.stderr and "Traceback" not in r.stderr
    r = _cli("run", "--suite", "smoke", "--url", vllm_server.base_url, "--api-key", "test-key", "--model", "other")
    assert r.returncode == 2 and "serves smollm2-135m-instruct, not 'other'" in r.stderr
    r = _cli("run", "--suite", "smoke", "--url", vllm_server.base_url, "--api-key", "test-key", "--api", "chat")
    assert r.returncode == 2 and "add1_mc, add1_loglik need(s) log-likelihoods" in r.stderr


def _samples(run: Path) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for line in (run / "samples.jsonl").read_text().splitlines():
        record = json.loads(line)
        out.setdefault(record["task"], []).append(record)
    return out


def _assert_same_loglikelihoods(a: Path, b: Path) -> None:
    """Scores of the log-likelihood tasks match, and so does every log-likelihood lm-eval saw, request by request."""
    ra, rb = (RunReport.from_json((run / "report.json").read_text()) for run in (a, b))
    loglik = {(r.task, r.metric): r for r in rb.rows if r.task in ("add1_mc", "add1_loglik")}
    assert {m for _, m in loglik} == {"acc", "acc_norm", "perplexity"} and all(r.n == 24 for r in loglik.values())
    for row in ra.rows:
        if (row.task, row.metric) in loglik:
            assert math.isclose(row.value, loglik[row.task, row.metric].value, rel_tol=1e-3), row
    sa, sb = _samples(a), _samples(b)
    for task in ("add1_mc", "add1_loglik"):
        assert len(sa[task]) == len(sb[task]) == 24
        for x, y in zip(sa[task], sb[task], strict=True):
            assert x["doc_id"] == y["doc_id"] and x["arguments"] == y["arguments"]
            for (lp_x, greedy_x), (lp_y, greedy_y) in zip(x["filtered_resps"], y["filtered_resps"], strict=True):
                assert abs(lp_x - lp_y) < 2e-3 and (greedy_x == greedy_y or abs(lp_x) > 1), (task, x["doc_id"])


@pytest.mark.server
def test_smoke_suite_endpoint_and_checkpoint_agree(vllm_server: RunningServer, tmp_path: Path) -> None:
    """Through the server (vLLM, token log-probs), lm-eval's own hf forward pass, and lm-eval's vllm model."""
    ep, hf, vllm = tmp_path / "endpoint", tmp_path / "hf", tmp_path / "vllm"
    url = vllm_server.base_url
    assert main(["run", "--suite", "smoke", "--url", url, "--api-key", "test-key", "--out", str(ep)]) == 0
    assert main(["run", "--suite", "smoke", "--mode", "checkpoint", "--out", str(hf)]) == 0
    assert main(["run", "--suite", "smoke", "--mode", "checkpoint", "--backend", "vllm", "--out", str(vllm)]) == 0
    report = RunReport.from_json((ep / "report.json").read_text())
    modes = [RunReport.from_json((run / "report.json").read_text()).mode for run in (hf, vllm)]
    assert report.mode.startswith("endpoint") and modes == ["checkpoint (hf)", "checkpoint (vllm)"]
    assert report.params == 134_515_008
    _assert_same_loglikelihoods(ep, hf)
    _assert_same_loglikelihoods(ep, vllm)
    mc = next(r for r in report.rows if r.task == "add1_mc" and r.metric == "acc")
    assert 0.3 < mc.value < 1.0  # the 3-shot 135M model is right on most 1-digit sums, not all: a real signal
    assert (ep / "report.png").read_bytes().startswith(PNG) and "| add1_gen | exact_match ↑ |" in (
        ep / "report.md").read_text()


@pytest.mark.server
def test_humaneval_through_the_server(vllm_server: RunningServer, tmp_path: Path) -> None:
    assert main(["run", "--suite", "humaneval", "--limit", "2", "--url", vllm_server.base_url, "--api-key", "test-key",
                 "--out", str(tmp_path)]) == 0
    report = RunReport.from_json((tmp_path / "report.json").read_text())
    (row,) = report.rows[:1]
    assert (row.task, row.metric, row.n) == ("humaneval", "pass_at_1", 2) and 0.0 <= row.value <= 1.0
    # Each score is the sandbox's verdict on that very response (SmolLM2-Instruct mostly answers in prose: 0).
    for sample in _samples(tmp_path)["humaneval"]:
        completion = sample["filtered_resps"][0]
        assert sample["pass_at_1"] == float(check_completion(sample["doc"], completion).passed)
        assert sample["pass_at_1"] == 0.0 or "return" in completion


@pytest.mark.server
def test_server_checks_score_the_parsers(vllm_server: RunningServer) -> None:
    out = run_checks(("tool_calls_required", "reasoning_format"), vllm_server.base_url, vllm_server.spec.name,
                     "test-key", 3)
    tools, reasoning = out["tool_calls_required"], out["reasoning_format"]
    assert tools["n"] == 3 and reasoning["n"] == 3
    # A forced call is grammar-constrained: whatever the model picks, the parsed arguments fit the tool's schema.
    assert tools["metrics"]["schema_valid"][0] == 1.0 and tools["metrics"]["decision_acc"][0] == 1.0
    # The test server steers `<think>` (SmolLM2 has no reasoning format): thinking, closed, then an answer.
    assert reasoning["metrics"]["thinking_present"][0] == 1.0 and reasoning["metrics"]["no_marker_leak"][0] == 1.0
    for record in reasoning["samples"]:
        assert "<think>" not in (record["message"]["content"] or "")


@pytest.mark.server
def test_cli_starts_its_own_server_for_the_tools_suite(tmp_path: Path) -> None:
    r = _cli("run", "--suite", "tools", "--limit", "2", "--out", str(tmp_path), timeout=SERVER_START_TIMEOUT + 300)
    assert r.returncode == 0, r.stderr[-2000:]
    report = RunReport.from_json((tmp_path / "report.json").read_text())
    assert {row.task for row in report.rows} == {"tool_calls_required", "tool_calls_auto"}
    assert (tmp_path / "server.log").is_file() and "| tool_calls_required | name_acc ↑ |" in r.stdout


@pytest.mark.server
def test_reasoning_check_on_a_reasoning_model(ministral_server: RunningServer) -> None:
    """tiny-ministral3 (random weights, [THINK] tokens): the server closes the thinking at the budget and an answer
    follows, so the format holds whatever the words; SmolLM2 above ends inside its thinking instead."""
    out = run_checks(("reasoning_format",), ministral_server.base_url, "tiny-ministral3", None, 2)["reasoning_format"]
    assert out["metrics"]["format_ok"][0] == 1.0, out["samples"]


def test_error_rates_read_lower_is_better() -> None:
    from eval.harness import SuiteResult
    from eval.report import rows_from

    result = SuiteResult()
    result.server_checks = {"transcription": {"metrics": {"wer": (0.5, 0.1), "exact": (0.2, 0.1)}, "n": 4}}
    rows = {r.metric: r.higher_is_better for r in rows_from(result)}
    assert rows == {"wer": False, "exact": True}
