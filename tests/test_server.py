"""The real server (real vLLM engine, real SmolLM2 weights) driven by the official openai client and raw httpx."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time

import httpx
import openai
import pytest

from models.tokenizers import load_tokenizer
from tests.conftest import RunningServer

pytestmark = pytest.mark.server

MODEL = "smollm2-135m-instruct"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=server.api_key, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def tokenizer(server: RunningServer):
    return load_tokenizer(server.spec)


def post(server: RunningServer, path: str, body: object, timeout: float = 300) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)  # ASCII: lone surrogates as escapes
    return httpx.post(f"{server.base_url}{path}", content=content, timeout=timeout,
                      headers={"Content-Type": "application/json", **server.headers})


def metric(server: RunningServer, name: str, labels: str = "") -> float:
    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    pattern = re.compile(rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+-]+)$", re.M)
    values = [float(v) for v in pattern.findall(text)]
    return sum(values)


# ----------------------------------------------------------------------------------------------------------------
# answers


def test_capital_of_france(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=32)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    assert r.object == "chat.completion" and r.model == MODEL


def test_default_sampling_answers(client: openai.OpenAI) -> None:
    """The README's example exactly as a user sends it: no sampling parameters, so the registry's defaults apply."""
    r = client.chat.completions.create(model=MODEL, messages=FRANCE)
    assert r.choices[0].message.content == "The capital of France is Paris."


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_stream_equals_non_stream_chat(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Write one sentence about the sea."}]
    full = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=40)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=40,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == full.choices[0].finish_reason and all(f is None for f in finishes[:-1])
    assert len({c.id for c in chunks}) == 1


def test_stream_equals_non_stream_completions(client: openai.OpenAI) -> None:
    prompt = "The three primary colors are"
    full = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=24)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=prompt, temperature=0, max_tokens=24, stream=True) if c.choices)
    assert streamed == full.choices[0].text and full.object == "text_completion"


def test_usage_matches_tokenizer_counts(client: openai.OpenAI, tokenizer) -> None:
    r = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=16, logprobs=True)
    assert r.usage.prompt_tokens == len(tokenizer.encode_chat(FRANCE))
    assert r.usage.completion_tokens == len(r.choices[0].logprobs.content)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    c = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=7, temperature=0)
    assert c.usage.prompt_tokens == len(tokenizer.encode("Once upon a time"))


def test_stream_include_usage(client: openai.OpenAI, tokenizer) -> None:
    chunks = list(client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.choices == [] and last.usage.prompt_tokens == len(tokenizer.encode_chat(FRANCE))
    assert all(c.usage is None for c in chunks[:-1])
    pieces = [c for c in chunks[:-1] if c.choices and c.choices[0].delta.content]
    assert last.usage.completion_tokens >= len(pieces) >= 1


def test_max_tokens_gives_length(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tell me a long story."}],
                                       max_completion_tokens=5, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5


def test_n_two_choices(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=FRANCE, n=2, temperature=1.0, seed=7, max_tokens=12)
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert all(c.message.content for c in r.choices) and r.usage.completion_tokens >= 2
    chunks = list(client.chat.completions.create(model=MODEL, messages=FRANCE, n=2, max_tokens=6, stream=True))
    texts = {0: "", 1: ""}
    roles = set()
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
            if ch.delta.role:
                roles.add(ch.index)
    assert roles == {0, 1} and all(texts.values())


def test_greedy_n_two_gives_identical_choices(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=FRANCE, n=2, temperature=0, max_tokens=8)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].message.content == r.choices[1].message.content
    assert r.usage.completion_tokens == 2 * 8 or r.choices[0].finish_reason == "stop"


def test_engine_refusal_is_400_before_streaming(server: RunningServer) -> None:
    body = {"model": MODEL, "messages": FRANCE, "max_tokens": 5, "min_tokens": 50, "stream": True}
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == 400 and "min_tokens" in r.json()["error"]["message"]


def test_seed_makes_sampling_repeatable(client: openai.OpenAI) -> None:
    kw = dict(model=MODEL, messages=FRANCE, temperature=1.0, seed=1234, max_tokens=16)
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    assert a == b


def test_stop_string(client: openai.OpenAI) -> None:
    base = client.completions.create(model=MODEL, prompt="1, 2, 3, 4, 5,", max_tokens=12, temperature=0)
    text = base.choices[0].text
    assert " 7" in text, text  # the model counts on; stop right before 7
    stopped = client.completions.create(model=MODEL, prompt="1, 2, 3, 4, 5,", max_tokens=12, temperature=0,
                                        stop=[" 7"])
    assert stopped.choices[0].text == text[: text.index(" 7")]
    assert stopped.choices[0].finish_reason == "stop"


def test_stop_token_ids(client: openai.OpenAI, tokenizer) -> None:
    """A stop token ends the choice and is not shown (vLLM's rule), while a held partial stop string is."""
    base = client.completions.create(model=MODEL, prompt="1, 2, 3, 4, 5,", max_tokens=12, temperature=0)
    text = base.choices[0].text
    ids = tokenizer.encode(text)
    stop_id = next(t for k, t in enumerate(ids) if k >= 2 and ids.index(t) == k)  # a token new to the text
    expected = tokenizer.decode(ids[: ids.index(stop_id)])
    assert expected and expected == text[: len(expected)]
    stopped = client.completions.create(model=MODEL, prompt="1, 2, 3, 4, 5,", max_tokens=12, temperature=0,
                                        extra_body={"stop_token_ids": [stop_id]}, stop=[expected[-1] + "@@"])
    assert stopped.choices[0].text == expected
    assert stopped.choices[0].finish_reason == "stop"


def test_sampling_parameters_accepted(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=FRANCE, temperature=0.7, top_p=0.9, max_tokens=8, presence_penalty=0.5,
        frequency_penalty=0.5, extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1})
    assert r.choices[0].message.content


def test_chat_logprobs(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob, abs=1e-3)  # greedy: chosen is the best


def test_completion_echo_logprobs(client: openai.OpenAI, tokenizer, server: RunningServer) -> None:
    """What lm-eval's loglikelihood requests need: echo + logprobs over prompt tokens (llama.cpp has none: a 400)."""
    ids = tokenizer.encode("The capital of France is Paris")
    if server.engine == "llamacpp":
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model=MODEL, prompt=ids, max_tokens=1, echo=True, logprobs=1)
        assert err.value.body["param"] == "echo"
        return
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=1, temperature=0, echo=True, logprobs=1)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == len(ids) + 1 and lp.token_logprobs[0] is None
    assert all(v <= 0 for v in lp.token_logprobs[1:])
    assert all(len(top) == 1 for top in lp.top_logprobs[1:])  # exactly the top-1, even where the prompt token isn't
    greedy = [max(top.values()) for top in lp.top_logprobs[1:]]
    assert all(g >= v - 1e-4 for g, v in zip(greedy, lp.token_logprobs[1:], strict=True))
    assert r.choices[0].text.startswith(tokenizer.decode(ids))


async def _async_burst(server: RunningServer) -> list[str]:
    client = openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key=server.api_key, max_retries=0)
    prompts = [f"Count from {i} to {i + 3}:" for i in range(4)]
    results = await asyncio.gather(*[client.completions.create(model=MODEL, prompt=p, max_tokens=8, temperature=0)
                                     for p in prompts])
    stream = await client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=8, stream=True)
    streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    await client.close()
    return [r.choices[0].text for r in results] + [streamed]


def test_async_client_concurrent(server: RunningServer) -> None:
    texts = asyncio.run(_async_burst(server))
    assert len(texts) == 5 and all(texts)


# ----------------------------------------------------------------------------------------------------------------
# auth


def test_auth_required_on_every_model_route(server: RunningServer) -> None:
    """With a key set, every route that does model work needs it (the tokenizer routes too); /health and /metrics
    stay open for probes and scrapers."""
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "test-key"}):
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/tokenize"),
                             ("POST", "/detokenize"), ("GET", "/tokenizer_info"), ("GET", "/no/such/route"),
                             ("POST", "/v1/audio/transcriptions"), ("POST", "/v1/audio/translations")):
            r = httpx.request(method, f"{server.base_url}{path}", headers=headers, json={"prompt": "hi"})
            assert r.status_code == 401, (headers, path)
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    bad = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert httpx.get(f"{server.base_url}/health").status_code == 200
    assert httpx.get(f"{server.base_url}/metrics").status_code == 200


# ----------------------------------------------------------------------------------------------------------------
# errors: 400 naming the field, never a 500, never a dead server

NESTED_ANY_OF: dict = {"type": "string"}
for _ in range(80):
    NESTED_ANY_OF = {"anyOf": [NESTED_ANY_OF, {"type": "integer"}]}

BAD_BODIES = [
    ("{not json", None),
    ("[1, 2]", None),
    ({"model": MODEL}, "messages"),
    ({"model": MODEL, "messages": []}, "messages"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"model": MODEL, "messages": FRANCE, "temperature": 5}, "temperature"),
    ({"model": MODEL, "messages": FRANCE, "temperature": "hot"}, "temperature"),
    ({"model": MODEL, "messages": FRANCE, "top_p": 0}, "top_p"),
    ({"model": MODEL, "messages": FRANCE, "max_tokens": 0}, "max_tokens"),
    ({"model": MODEL, "messages": FRANCE, "n": 1000}, "n"),
    ({"model": MODEL, "messages": FRANCE, "stop": 5}, "stop"),
    ({"model": MODEL, "messages": FRANCE, "stream_options": {"include_usage": True}}, None),
    ({"model": MODEL, "messages": FRANCE, "top_logprobs": 2}, None),
    ({"model": MODEL, "messages": FRANCE, "top_logprobs": 99, "logprobs": True}, "top_logprobs"),
    ({"model": MODEL, "messages": FRANCE, "max_tokens": 4000}, "messages"),
    # found by testing the running server as a hostile client would: each was a 500 once
    ('{"model": "m", "messages": ' + "[" * 5000 + "]" * 5000 + "}", "messages"),
    ({"model": MODEL, "messages": FRANCE, "response_format": {"type": "json_schema", "json_schema": {
        "name": "deep", "schema": NESTED_ANY_OF}}}, "response_format.json_schema.schema"),
    ({"model": MODEL, "messages": FRANCE, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": NESTED_ANY_OF}}]}, "tools.0.function"),
    ({"model": MODEL, "messages": FRANCE, "stop": ["\ud800"]}, "stop.0"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi \udfff"}]}, "messages.0.content"),
    ({"model": MODEL, "messages": FRANCE, "stream": "yes"}, "stream"),
    ({"model": MODEL, "messages": FRANCE, "logprobs": 1}, "logprobs"),
    ({"model": MODEL, "messages": FRANCE, "logit_bias": {"not-an-id": 5}}, "logit_bias"),
    ({"model": MODEL, "messages": FRANCE, "logit_bias": {"999999": 5}}, "logit_bias"),
    ({"model": MODEL, "messages": FRANCE, "logit_bias": {"5": 500}}, "logit_bias"),
    # a thinking budget runs one engine request per choice: 9 choices exceed the server's 8 slots
    ({"model": MODEL, "messages": FRANCE, "n": 9, "max_reasoning_tokens": 4}, "n"),
    ({"model": MODEL, "messages": [{"role": "user", "content": ""}] * 100_000}, "messages"),  # cost no characters
]


@pytest.mark.parametrize(("body", "param"), BAD_BODIES)
def test_bad_chat_requests_are_400(server: RunningServer, body: object, param: str | None) -> None:
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param


@pytest.mark.parametrize(("body", "param"), [
    ({"model": MODEL}, "prompt"),
    ({"model": MODEL, "prompt": ""}, "prompt"),
    ({"model": MODEL, "prompt": [-1, 5]}, "prompt"),
    ({"model": MODEL, "prompt": "hi", "logprobs": 50}, "logprobs"),
    ({"model": MODEL, "prompt": "hi", "suffix": "x"}, "suffix"),
    ({"model": MODEL, "prompt": ["hi"] * 9}, "prompt"),  # more prompts than the server's 8 slots
    ({"model": MODEL, "prompt": ["a"] * 500_000}, "prompt"),  # refused before any prompt is tokenized
    ({"model": MODEL, "prompt": [1, 10**6], "stream": True}, "prompt"),  # not 200 + an error event
    ({"model": MODEL, "prompt": "x" * 3_000_000}, "prompt"),  # cannot fit the context: refused untokenized
    ({"model": MODEL, "prompt": "hi", "stop": "\ud800"}, "stop"),
    ({"model": MODEL, "prompt": "hi", "stop": ["x" * 5000]}, "stop.0"),
    ({"model": MODEL, "prompt": "hi", "stop_token_ids": [10**6]}, "stop_token_ids"),
])
def test_bad_completion_requests_are_400(server: RunningServer, body: object, param: str) -> None:
    r = post(server, "/v1/completions", body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_oversized_body_is_413(server: RunningServer) -> None:
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * (33 << 20)}]})
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_prompt_longer_than_context(client: openai.OpenAI, server: RunningServer) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "word " * 2500}])
    message = err.value.body["message"]
    assert "2048" in message and re.search(r"\d{4} in the messages", message)
    assert err.value.body["code"] == "context_length_exceeded"


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-17", messages=FRANCE)
    assert err.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-17")


def test_server_still_serving_after_bad_input(client: openai.OpenAI, server: RunningServer) -> None:
    for body, _ in BAD_BODIES[:6]:
        post(server, "/v1/chat/completions", body)
    assert httpx.get(f"{server.base_url}/health").status_code == 200
    r = client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=4, temperature=0)
    assert r.choices[0].message.content
    assert metric(server, "cascade_http_requests_total", '{route="/v1/chat/completions",status="500"}') == 0


# ----------------------------------------------------------------------------------------------------------------
# disconnects, admission control, metrics

LONG = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me everything."}], "max_tokens": 1500,
        "ignore_eos": True, "stream": True}


def _open_stream(server: RunningServer, stop: threading.Event, started: threading.Event) -> None:
    with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", json=LONG, headers=server.headers,
                      timeout=120) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 4:
                started.set()
            if stop.is_set():
                return  # closing the connection mid-stream


def test_disconnect_aborts_generation(server: RunningServer) -> None:
    aborted = metric(server, "cascade_requests_aborted_total")
    engine_counter = {"vllm": "vllm:generation_tokens_total", "llamacpp": "llamacpp:tokens_predicted_total"}
    tokens_at_start = metric(server, engine_counter[server.engine])
    stop, started = threading.Event(), threading.Event()
    t = threading.Thread(target=_open_stream, args=(server, stop, started))
    t.start()
    assert started.wait(120)
    stop.set()
    t.join(30)
    deadline = time.monotonic() + 120  # a state change, not a speed: generous on a loaded machine
    while metric(server, "cascade_requests_aborted_total") == aborted and time.monotonic() < deadline:
        time.sleep(0.2)
    assert metric(server, "cascade_requests_aborted_total") == aborted + 1
    # The engine itself stopped: its slot is released and no more tokens are generated (1500 would take ~40 s).
    # llama.cpp adds a request's tokens to its counter when the slot is released, so wait for the release first:
    # reading the counter before it raced the cancellation (CI saw 311 -> 316).
    engine_running = {"vllm": "vllm:num_requests_running", "llamacpp": "llamacpp:requests_processing"}[server.engine]
    while metric(server, engine_running) > 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert metric(server, engine_running) == 0
    before = metric(server, engine_counter[server.engine])
    time.sleep(2)
    assert metric(server, engine_counter[server.engine]) == before
    assert before - tokens_at_start < LONG["max_tokens"]
    assert metric(server, "cascade_requests_running") == 0


def test_non_stream_disconnect_aborts(server: RunningServer) -> None:
    aborted = metric(server, "cascade_requests_aborted_total")
    body = dict(LONG, stream=False)
    with pytest.raises(httpx.ReadTimeout):
        post(server, "/v1/chat/completions", body, timeout=1.5)
    deadline = time.monotonic() + 120  # a state change, not a speed: generous on a loaded machine
    while metric(server, "cascade_requests_aborted_total") == aborted and time.monotonic() < deadline:
        time.sleep(0.2)
    assert metric(server, "cascade_requests_aborted_total") == aborted + 1


def test_full_queue_gets_429(server: RunningServer) -> None:
    """The session server admits 8 requests in flight; the 9th is refused with Retry-After."""
    stop = threading.Event()
    starts = [threading.Event() for _ in range(8)]
    threads = [threading.Thread(target=_open_stream, args=(server, stop, s)) for s in starts]
    for t in threads:
        t.start()
    try:
        assert all(s.wait(180) for s in starts)
        r = post(server, "/v1/chat/completions", {"model": MODEL, "messages": FRANCE, "max_tokens": 2})
        assert r.status_code == 429 and r.headers["Retry-After"] == "1"
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    deadline = time.monotonic() + 120  # a state change, not a speed: generous on a loaded machine
    while time.monotonic() < deadline:
        r = post(server, "/v1/chat/completions", {"model": MODEL, "messages": FRANCE, "max_tokens": 2})
        if r.status_code == 200:
            break
        time.sleep(0.5)
    assert r.status_code == 200


def test_metrics_exposed(client: openai.OpenAI, server: RunningServer) -> None:
    client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=3)
    text = httpx.get(f"{server.base_url}/metrics").text
    for name in ("cascade_http_requests_total", "cascade_time_to_first_token_seconds_bucket",
                 "cascade_e2e_request_latency_seconds_bucket", "cascade_prompt_tokens_total",
                 "cascade_generation_tokens_total", "cascade_requests_running", "cascade_requests_waiting",
                 {"vllm": "vllm:num_requests_running", "llamacpp": "llamacpp:requests_processing"}[server.engine]):
        assert name in text, name
    assert metric(server, "cascade_http_requests_total", '{route="/v1/chat/completions",status="200"}') >= 1


def test_logit_bias_steers_the_choice(client: openai.OpenAI, tokenizer) -> None:
    plain = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=1, temperature=0)
    first = tokenizer.encode(plain.choices[0].text, add_special_tokens=False)[0]
    banned = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=1, temperature=0,
                                       logit_bias={str(first): -100})
    assert banned.choices[0].text != plain.choices[0].text
    forced = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=1, temperature=0,
                                       logit_bias={str(tokenizer.encode(" Rome", add_special_tokens=False)[0]): 100})
    assert forced.choices[0].text == " Rome"


def test_big_unauthenticated_bodies_are_refused_and_chat_goes_on(server: RunningServer,
                                                                 client: openai.OpenAI) -> None:
    """Six concurrent 3 MB /tokenize calls without the key once kept the tokenizer busy for seconds while /health
    stayed green: now each is a 401 before anything is read or tokenized, and chat answers as usual."""
    body = json.dumps({"prompt": "word " * 600_000})

    def hammer() -> int:
        return httpx.post(f"{server.base_url}/tokenize", content=body, timeout=120,
                          headers={"Content-Type": "application/json"}).status_code

    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(hammer())) for _ in range(6)]
    for t in threads:
        t.start()
    r = client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=8, temperature=0)
    for t in threads:
        t.join(120)
    assert results == [401] * 6 and r.choices[0].message.content
    with_key = httpx.post(f"{server.base_url}/tokenize", content=body, timeout=120,
                          headers={"Content-Type": "application/json", **server.headers})
    assert with_key.status_code == 400 and with_key.json()["error"]["code"] == "context_length_exceeded"
