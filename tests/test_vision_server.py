"""A tiny Mistral 3 with vision (Pixtral ViT, patch merger, Mistral decoder) served by vLLM from Mistral's native
files on the CPU, through torchvision's Python half (serve/torchvision_shim.py): images in chat through the official
openai client, the same greedy tokens as transformers, bad images refused by part."""

from __future__ import annotations

import base64
import io
import subprocess
import sys

import httpx
import numpy as np
import openai
import pytest

from models.tokenizers import load_tokenizer
from tests.conftest import REPO, LocalRenderer, RunningServer

MODEL = "tiny-ministral3-vision"


def picture(width: int = 56, height: int = 40, fmt: str = "PNG", seed: int = 0) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def image_message(raw: bytes, mime: str = "image/png", text: str = "What is in the picture?") -> list[dict]:
    url = f"data:{mime};base64," + base64.b64encode(raw).decode()
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


def test_the_shim_is_off_unless_activated() -> None:
    """Text and audio serving never see torchvision; activated, its Python half and vLLM's Pixtral import."""
    from serve.torchvision_shim import shim_dir

    assert not list(shim_dir().rglob("*.so")) and (shim_dir() / "sitecustomize.py").is_file()
    off = subprocess.run([sys.executable, "-c", "import torchvision"], cwd=REPO, capture_output=True, text=True)
    assert off.returncode != 0 and "No module named 'torchvision'" in off.stderr
    on = subprocess.run([sys.executable, "-c", (
        "from serve.torchvision_shim import activate; activate(); import os, subprocess, sys\n"
        "import vllm.model_executor.models.pixtral\n"
        # a process spawned from here (as vLLM's engine processes are) imports it too
        "subprocess.run([sys.executable, '-c', 'import torchvision.transforms.v2'], check=True)")],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert on.returncode == 0, on.stderr[-2000:]


@pytest.mark.server
@pytest.mark.parametrize(("fmt", "mime"), [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp"),
                                           ("GIF", "image/gif"), ("BMP", "image/bmp")])
def test_chat_with_an_image(vision_server: RunningServer, fmt: str, mime: str) -> None:
    messages = image_message(picture(fmt=fmt), mime)
    r = client(vision_server).chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
    prompt = LocalRenderer(vision_server.spec).prompt(messages)
    # 56x40 px, 8-px patches merged 2x2: 4 x 3 [IMG], a [IMG_BREAK] per row but the last, which ends with [IMG_END]
    assert prompt.count(10) == 12 and prompt.count(12) == 2 and prompt.count(13) == 1
    assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens <= 4


@pytest.mark.server
def test_greedy_tokens_match_transformers(vision_server: RunningServer) -> None:
    import torch
    from transformers import Mistral3ForConditionalGeneration

    messages = image_message(picture(48, 64, seed=3), text="Describe it.")
    tok = load_tokenizer(vision_server.spec)
    ids, _, images = tok.encode_chat_media(messages)  # type: ignore[attr-defined]
    model = Mistral3ForConditionalGeneration.from_pretrained(vision_server.spec.checkpoint_dir).eval()
    pixels = torch.tensor(np.stack(images))  # mistral_common's resize and normalisation: [images, C, H, W]
    sizes = torch.tensor([list(i.shape[1:]) for i in images])
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), pixel_values=pixels, image_sizes=sizes,
                             max_new_tokens=8, min_new_tokens=8, do_sample=False)
    expected = out[0, len(ids):].tolist()
    r = client(vision_server).chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                                      extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == tok.decode(expected)


@pytest.mark.server
def test_images_are_resized_to_the_models_largest(vision_server: RunningServer) -> None:
    """A 400x300 image is scaled to fit 64 px (mistral_common's rule, as vLLM's processor applies it)."""
    messages = image_message(picture(400, 300))
    messages[0]["content"].append(messages[0]["content"][1])  # two images: the server's limit
    r = client(vision_server).chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    prompt = LocalRenderer(vision_server.spec).prompt(messages)
    assert prompt.count(10) == 2 * 4 * 3 and r.usage.prompt_tokens == len(prompt)


@pytest.mark.server
def test_bad_images_are_400_by_part(vision_server: RunningServer) -> None:
    def post(messages: list[dict]) -> httpx.Response:
        return httpx.post(f"{vision_server.base_url}/v1/chat/completions", timeout=120,
                          json={"model": MODEL, "max_tokens": 2, "messages": messages})

    wav = base64.b64encode(b"RIFF0000WAVE").decode()
    cases = [
        (image_message(b"not an image"), "messages[0].content[1].image_url", "cannot decode the image"),
        (image_message(picture(600, 500)), "messages[0].content[1].image_url", "250000"),
        (image_message(picture(), "application/pdf"), "messages[0].content[1].image_url.url", "must hold an image"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}],
         "messages[0].content[0].image_url.url", "remote media URLs are off"),
        ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": wav, "format": "wav"}}]}],
         "messages[0].content[0]", "cannot take audio"),
        ([{"role": "user", "content": [image_message(picture())[0]["content"][1]] * 3}], "messages[0].content[2]",
         "at most 2 image"),
    ]
    for messages, param, words in cases:
        r = post(messages)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param and words in r.json()["error"]["message"], r.text
    assert post([{"role": "user", "content": "Hi"}]).status_code == 200
    assert post(image_message(picture())).status_code == 200


@pytest.mark.server
def test_image_eval_checks_through_the_server(vision_server: RunningServer) -> None:
    """The `image` suite's checks (shapes drawn here, real handwritten digits) score every case."""
    from eval.server_checks import run_checks

    out = run_checks(("shape_qa", "digit_qa"), vision_server.base_url, MODEL, None, 3)
    assert out["shape_qa"]["n"] == 3 and set(out["shape_qa"]["metrics"]) == {"shape_acc", "colour_acc"}
    assert out["digit_qa"]["n"] == 3 and set(out["digit_qa"]["metrics"]) == {"digit_acc"}
