"""torchvision's Python half, for serving vision models on the CPU build of torch.

vLLM's Pixtral / Mistral 3 model files import transformers' Pixtral image processor, which imports
`torchvision.transforms.v2` unconditionally. The only torchvision wheels the package registries hold are CUDA builds:
PyPI's 0.28.0 (the release made for torch 2.13) links `libtorch_cuda.so` and `libcudart.so.13`, and importing it
beside `torch==2.13.0+cpu` fails ("operator torchvision::nms does not exist"); no `+cpu` build can be had by name
(checked: `pip download torchvision==0.28.0+cpu` finds none). So the Makefile removes it, and this module keeps a
copy of its pure-Python files (no `_C.so`, no bundled CUDA or image libraries) outside site-packages, in
`.venv/torchvision-shim/`, with a `sitecustomize.py` that defines the two operator schemas torchvision's
`_meta_registrations.py` registers fakes for unconditionally (shared/notes/multimodal.md §2.4). Its C operators
(nms, roi_align, image decoders) stay unavailable: vLLM's Pixtral path resizes with torch ops only.

Off by default: `activate()` puts the folder first on `sys.path` and `PYTHONPATH` (so vLLM's spawned processes see
it too) only when the served model takes images. Text and audio serving never import torchvision.

    python -m serve.torchvision_shim install   # run by `make install` (DEVICE=cpu)
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

VERSION = "0.28.0"  # the torchvision release built against torch 2.13
# sha256 of the wheel pip picks on each Python: pinned, so a changed file on the index is refused
WHEEL_SHA256 = {"cp311": "7e80f543b22503d9415e126db5f0ff3917036925e38560ee6b9ae38c571a4002"}
SITECUSTOMIZE = "from serve.torchvision_shim import register_ops\nregister_ops()\n"


class ShimError(RuntimeError):
    pass


def shim_dir() -> Path:
    return Path(os.environ.get("CASCADE_TORCHVISION_SHIM", Path(sys.prefix) / "torchvision-shim"))


def register_ops() -> None:
    """The schemas torchvision's Python code registers fake kernels for at import (the real ones live in _C.so)."""
    import torch

    if _LIBS:
        return
    try:
        lib = torch.library.Library("torchvision", "DEF")
    except RuntimeError:  # the namespace is defined already: a real torchvision build is loaded
        return
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBS.append(lib)  # the registration lives as long as the Library object


_LIBS: list = []


def activate() -> None:
    """Make `import torchvision` work in this process and the engine processes it spawns (a no-op where a real
    torchvision is installed: the CUDA profile's)."""
    import importlib.util

    folder = shim_dir()
    if str(folder) not in sys.path and importlib.util.find_spec("torchvision") is not None:
        return
    if not (folder / "torchvision" / "__init__.py").is_file():
        raise ShimError(f"serving a vision model on CPU needs torchvision's Python files in {folder}: run "
                        "`make install` (or `python -m serve.torchvision_shim install`)")
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(folder) not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(folder), *paths])
    register_ops()


def install(dest: Path | None = None) -> Path:
    """Download the pinned wheel (from the configured package index), check its hash, keep its .py files."""
    dest = dest or shim_dir()
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    if tag not in WHEEL_SHA256:
        raise ShimError(f"no pinned torchvision {VERSION} wheel hash for Python {tag}: add it to WHEEL_SHA256")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp,
                        f"torchvision=={VERSION}"], check=True)
        wheel = next(Path(tmp).glob("torchvision-*.whl"))
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != WHEEL_SHA256[tag]:
            raise ShimError(f"{wheel.name}: sha256 {digest} is not the pinned {WHEEL_SHA256[tag]}")
        staging = Path(tempfile.mkdtemp(dir=dest.parent if dest.parent.is_dir() else None))
        staging.chmod(0o755)  # mkdtemp makes it private: a venv installed by root is read by the server's user
        with zipfile.ZipFile(wheel) as archive:
            for name in archive.namelist():
                if name.startswith("torchvision/") and name.endswith(".py"):
                    archive.extract(name, staging)
        (staging / "sitecustomize.py").write_text(SITECUSTOMIZE)
        (staging / "VERSION").write_text(f"torchvision {VERSION} {digest}\n")
    shutil.rmtree(dest, ignore_errors=True)
    staging.replace(dest)  # whole or not at all
    return dest


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args != ["install"]:
        print("usage: python -m serve.torchvision_shim install", file=sys.stderr)
        return 2
    try:
        print(f"torchvision {VERSION} (Python files only) in {install()}")
    except (ShimError, subprocess.CalledProcessError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
