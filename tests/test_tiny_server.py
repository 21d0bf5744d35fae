"""A tiny random Mistral model with the real Tekken tokenizer in the real vLLM engine; auth off."""

from __future__ import annotations

import httpx
import openai
import pytest

from models.tokenizers import load_tokenizer
from tests.conftest import RunningServer

pytestmark = pytest.mark.server


def test_auth_off_serves_without_key(tiny_server: RunningServer) -> None:
    r = httpx.get(f"{tiny_server.base_url}/v1/models")
    assert r.status_code == 200 and r.json()["data"][0]["id"] == "tiny-mistral"


def test_mistral_prompt_rendered_with_mistral_common(tiny_server: RunningServer) -> None:
    client = openai.OpenAI(base_url=f"{tiny_server.base_url}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    r = client.chat.completions.create(model="tiny-mistral", messages=messages, max_tokens=8, temperature=0)
    tok = load_tokenizer(tiny_server.spec)
    assert r.usage.prompt_tokens == len(tok.encode_chat(messages))
    assert r.usage.completion_tokens == 8 or r.choices[0].finish_reason == "stop"


def test_mistral_role_order_error_is_400(tiny_server: RunningServer) -> None:
    client = openai.OpenAI(base_url=f"{tiny_server.base_url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny-mistral", max_tokens=2,
                                       messages=[{"role": "assistant", "content": "I go first"}])
    assert err.value.body["param"] == "messages"


def test_token_id_prompts_and_stream(tiny_server: RunningServer) -> None:
    client = openai.OpenAI(base_url=f"{tiny_server.base_url}/v1", api_key="unused", max_retries=0)
    prompts = [[1, 1000, 1001, 1002], [1, 2000, 2001]]
    full = client.completions.create(model="tiny-mistral", prompt=prompts, max_tokens=5, temperature=0)
    assert sorted(c.index for c in full.choices) == [0, 1]
    assert full.usage.prompt_tokens == 7
    streamed = {0: "", 1: ""}
    for chunk in client.completions.create(model="tiny-mistral", prompt=prompts, max_tokens=5, temperature=0,
                                           stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert streamed == {c.index: c.text for c in full.choices}


def test_tiny_ministral3_serves(ministral_server: RunningServer) -> None:
    """Ministral3ForCausalLM (YaRN rope, Tekken v13) loads in vLLM and generates."""
    client = openai.OpenAI(base_url=f"{ministral_server.base_url}/v1", api_key="unused", max_retries=0)
    r = client.completions.create(model="tiny-ministral3", prompt=[1, 22, 333, 4444], max_tokens=4, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 4 and r.choices[0].finish_reason == "length"


def test_a_text_model_refuses_media_by_part(tiny_server: RunningServer) -> None:
    import base64

    client = openai.OpenAI(base_url=f"{tiny_server.base_url}/v1", api_key="unused", max_retries=0)
    wav = base64.b64encode(b"RIFF").decode()
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny-mistral", max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "text", "text": "hi"}, {"type": "input_audio", "input_audio": {"data": wav, "format": "wav"}}]}])
    assert err.value.body["param"] == "messages[0].content[1]" and "text only" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.audio.transcriptions.create(model="tiny-mistral", file=("a.wav", b"RIFF"))
    assert err.value.body["param"] == "model" and "does not take audio" in err.value.body["message"]
