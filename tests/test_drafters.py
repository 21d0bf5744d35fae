"""Students as drafters of their teacher, on both engines: greedy output is what the target alone writes (speculation
is lossless), drafting shows in /metrics, and what speculation cannot honour is a 400 naming the field.

The drafter here is tiny-mistral cut to its first layer (the way a cascade stage starts), so it shares the target's
tokenizer and often agrees with it."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from models.registry import ModelSpec
from tests.conftest import RunningServer, start, stop_server

pytestmark = pytest.mark.server

PROMPT = [1, 1000, 1001, 1002, 1003]


@pytest.fixture(scope="module")
def drafter(tiny_mistral: ModelSpec, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from distill.model_io import load_model, model_from_state, plain_state, save_model
    from distill.prune import drop_layers

    out = tmp_path_factory.mktemp("drafter") / "tiny-mistral-1layer"
    model = load_model(tiny_mistral.checkpoint_dir)
    config, state = drop_layers(model.config, plain_state(model), [0])
    save_model(model_from_state(config, state), out, tokenizer_from=tiny_mistral.checkpoint_dir)
    return out


@pytest.fixture(scope="module", params=["vllm", "llamacpp"])
def drafted(request: pytest.FixtureRequest, tiny_mistral: ModelSpec, drafter: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    engine_args = ("--enforce-eager",) if request.param == "vllm" else ()
    server = start(tiny_mistral, tmp_path_factory.mktemp(f"drafted-{request.param}"), "--max-model-len", "512",
                   "--draft-model", str(drafter), "--num-draft-tokens", "3", *engine_args, engine=request.param)
    yield server
    stop_server(server)


def complete(server: RunningServer, **extra: object) -> httpx.Response:
    return httpx.post(f"{server.base_url}/v1/completions", timeout=300, json={
        "model": "tiny-mistral", "prompt": PROMPT, "max_tokens": 24, "temperature": 0, "ignore_eos": True} | extra)


def counter(server: RunningServer, name: str) -> float:
    text = httpx.get(f"{server.base_url}/metrics", timeout=30).text
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def test_drafting_is_lossless_and_counted(drafted: RunningServer, request: pytest.FixtureRequest) -> None:
    plain_server = request.getfixturevalue("tiny_server" if drafted.engine == "vllm" else "tiny_llamacpp_server")
    expected = complete(plain_server).json()["choices"][0]["text"]
    r = complete(drafted)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected
    assert r.json()["usage"]["completion_tokens"] == 24
    drafted_tokens = counter(drafted, "cascade_spec_decode_draft_tokens")
    accepted = counter(drafted, "cascade_spec_decode_accepted_tokens")
    assert drafted_tokens > 0 and 0 <= accepted <= drafted_tokens
    rate = counter(drafted, "cascade_spec_decode_acceptance_rate")
    assert rate == pytest.approx(accepted / drafted_tokens)
    assert counter(drafted, "cascade_spec_decode_mean_accepted_length") >= 1.0


def test_what_speculation_cannot_honour_is_a_400(drafted: RunningServer) -> None:
    refused = {"vllm": [({"min_p": 0.1}, "min_p"), ({"logit_bias": {"1000": 5}}, "logit_bias")],
               "llamacpp": [({"logprobs": 1}, "logprobs")]}[drafted.engine]
    for extra, param in refused:
        for stream in (False, True):
            r = complete(drafted, stream=stream, **extra)
            assert r.status_code == 400, (extra, r.text)
            assert r.json()["error"]["param"] == param
    assert complete(drafted).status_code == 200


def test_speed_up_records_feed_the_start_up_warning(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """The benchmark's measurement warns a later start whose drafter was slower; a damaged record file is ignored."""
    from serve import drafters

    monkeypatch.setenv("CASCADE_HOME", str(tmp_path))
    drafters.record_speedup("t", "d", "vllm", 3, 0.4, 0.2)
    drafters.record_speedup("t", "d", "llamacpp", 3, 1.3, 0.6)
    with caplog.at_level("INFO", logger="serve.drafters"):
        drafters.warn_if_slower("t", "d", "vllm", 3)
        drafters.warn_if_slower("t", "d", "llamacpp", 3)
        drafters.warn_if_slower("t", "d", "vllm", 5)  # another drafted-token count: not measured
    warned = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "0.40x" in warned[0].getMessage()
    assert "no measured speed-up" in caplog.records[-1].getMessage()
    (tmp_path / "bench" / "drafters.json").write_text('{"t|d|vllm|k=3": {"speedup": "fast"}, "x": ')
    assert drafters.load_speedups() == {}
    drafters.warn_if_slower("t", "d", "vllm", 3)  # no traceback
