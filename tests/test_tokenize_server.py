"""/tokenize, /detokenize, /tokenizer_info on the real server: what lm-eval's remote tokenizer relies on."""

from __future__ import annotations

import json

import httpx
import pytest

from models.tokenizers import load_tokenizer
from tests.conftest import LocalRenderer, RunningServer

pytestmark = pytest.mark.server

def post(server: RunningServer, path: str, body: dict) -> httpx.Response:
    # json.dumps writes a lone surrogate as its escape (httpx's json= would refuse to encode it)
    return httpx.post(f"{server.base_url}{path}", content=json.dumps(body), timeout=60,
                      headers={"Content-Type": "application/json", **server.headers})


TEXTS = ["Hello world", "Q: What is 80 plus 29?\nA: 109", "  leading spaces, émojis 🙂 and\ttabs", "<|im_end|>"]


def test_tokenize_matches_the_local_tokenizer(server: RunningServer) -> None:
    tok = load_tokenizer(server.spec)
    for text in TEXTS:
        for special in (True, False):
            r = post(server, "/tokenize", {"prompt": text, "add_special_tokens": special})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["tokens"] == tok.encode(text, add_special_tokens=special)
            assert body["count"] == len(body["tokens"]) and body["max_model_len"] == 2048
            back = post(server, "/detokenize", {"tokens": body["tokens"]}).json()
            assert back["prompt"] == tok.decode(body["tokens"])


def test_tokenize_chat_form_equals_the_chat_prompt(server: RunningServer) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    r = post(server, "/tokenize", {"messages": messages, "return_token_strs": True})
    assert r.status_code == 200, r.text
    assert r.json()["tokens"] == LocalRenderer(server.spec).prompt(messages)
    assert "".join(r.json()["token_strs"]).startswith("<|im_start|>system")


def test_tokenizer_info(server: RunningServer) -> None:
    info = httpx.get(f"{server.base_url}/tokenizer_info", headers=server.headers).json()
    assert info["eos_token"] == "<|im_end|>" and info["vocab_size"] == 49152
    assert "im_start" in info["chat_template"] and info["model_max_length"] == 2048


def test_lm_eval_remote_tokenizer_agrees(server: RunningServer) -> None:
    """lm-eval's `tokenizer_backend=remote` (used for models this machine does not hold) sees our ids."""
    from lm_eval.utils import RemoteTokenizer

    remote = RemoteTokenizer(f"{server.base_url}/v1/completions", auth_token=server.api_key)
    tok = load_tokenizer(server.spec)
    assert [remote.encode(t) for t in TEXTS] == [tok.encode(t, add_special_tokens=False) for t in TEXTS]
    assert remote.eos_token_id == tok.eos_token_id


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/tokenize", {}, "prompt"),
    ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "prompt"),
    ("/tokenize", {"prompt": 3}, "prompt"),
    ("/tokenize", {"messages": [{"role": "wizard", "content": "b"}]}, "messages.0.role"),
    ("/detokenize", {"tokens": [-1]}, "tokens.0"),
    ("/detokenize", {"tokens": [10**9]}, "tokens"),
    ("/detokenize", {}, "tokens"),
    ("/tokenize", {"prompt": "a\ud800b"}, "prompt"),  # a lone surrogate: no tokenizer can encode it
    ("/tokenize", {"prompt": "x" * 3_000_000}, "prompt"),  # cannot fit the context: refused before tokenizing
])
def test_bad_tokenizer_requests_are_400(server: RunningServer, path: str, body: dict, param: str) -> None:
    r = post(server, path, body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_unknown_model_is_404(server: RunningServer) -> None:
    r = post(server, "/tokenize", {"prompt": "a", "model": "other"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
