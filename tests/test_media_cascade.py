"""A cascade over audio and vision parents (Ministral 3's way): only the decoder is pruned, the encoder is copied and
frozen, the projector is carried over (rotated with the residual stream) and trained; teacher and student share the
encoder's outputs, computed once with the data. The tiny recipes run here end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from distill.cascade import RecipeError, load_recipe, plan_recipe, run_recipe
from distill.media_data import build_media_tokens, render_item, source_items
from distill.media_lm import MediaLM, encode_media, join, load_full, split
from distill.model_io import load_model
from distill.prune import pca_rotation, rotate_hidden
from models.prepare import prepare
from models.registry import get_model
from models.tokenizers import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"tiny-voxtral": ROOT / "distill/recipes/tiny-voxtral-cascade.yaml",
           "tiny-ministral3-vision": ROOT / "distill/recipes/tiny-vision-cascade.yaml"}


@pytest.fixture(autouse=True)
def home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path_factory.getbasetemp() / "media-cascade-home"
    monkeypatch.setenv("CASCADE_HOME", str(path))
    return path


def one_item(parent: str) -> tuple[torch.Tensor, torch.Tensor, MediaLM]:
    """(ids [1, T], encoder features, the parent as a MediaLM) for the recipe's first item."""
    spec = get_model(parent)
    prepare(spec)
    recipe = load_recipe(RECIPES[parent])
    _, item = next(source_items(recipe.data.sources[0], 0))
    ids, _, audio, images = render_item(item, load_tokenizer(spec))
    full = load_full(spec.checkpoint_dir).eval()
    return torch.tensor([ids]), encode_media(full, audio, images), MediaLM(full).eval()


@pytest.mark.parametrize("parent", sorted(RECIPES))
def test_projector_follows_a_full_rank_rotation_exactly(parent: str) -> None:
    """Pruning's rotation of the residual stream, applied at full rank to decoder and projector: the same model."""
    ids, media, model = one_item(parent)
    full = model.full_model()
    lm_config, lm_state, rest = split(full)
    d = lm_config.hidden_size
    q = pca_rotation(_spd(d), d)  # an orthonormal [d, d] rotation
    config, state = rotate_hidden(lm_config, lm_state, q.float())
    rotated = MediaLM(join(full.config, config, state, rest, q.float())).eval()
    with torch.no_grad():
        before = model.model(ids, media=media).last_hidden_state @ model.lm_head.weight.T
        after = rotated.model(ids, media=media).last_hidden_state @ rotated.lm_head.weight.T
    assert torch.allclose(before, after, atol=2e-4), (before - after).abs().max()


def _spd(d: int) -> torch.Tensor:
    a = torch.randn(d, 3 * d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return a @ a.T


def test_split_and_join_are_lossless() -> None:
    full = load_full(get_model("tiny-voxtral").checkpoint_dir)
    back = join(full.config, *split(full))
    assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), back.state_dict().values(), strict=True))


@pytest.mark.parametrize("parent", sorted(RECIPES))
def test_tiny_media_cascade_runs(parent: str, home: Path) -> None:
    for name in ("tiny-voxtral", "tiny-ministral3-vision"):
        prepare(get_model(name))
    recipe = load_recipe(RECIPES[parent])
    card = run_recipe(recipe, progress=False)[0]
    student_dir = home / "models" / card["name"]
    assert "copied" in card["encoder"]["kept"] and "trained" in card["projector"]
    assert card["final"]["val_kl"] < card["pruned_only"]["val_kl"]
    # the encoder is the parent's, verbatim; the projector was rotated to the new width and trained
    parent_full, student_full = load_full(get_model(parent).checkpoint_dir), load_full(student_dir)
    encoder = "model.audio_tower." if parent == "tiny-voxtral" else "model.vision_tower."
    parent_state, student_state = parent_full.state_dict(), student_full.state_dict()
    assert all(torch.equal(v, student_state[k]) for k, v in parent_state.items() if k.startswith(encoder))
    assert student_state["model.multi_modal_projector.linear_2.weight"].shape == (96, 96)
    assert get_model(card["name"]).media == get_model(parent).media  # registered as the same kind of model
    assert (student_dir / "params.json").is_file() and (student_dir / "consolidated.safetensors").is_file()
    # the data cache holds encoder features, one row per placeholder, shared by every stage
    shards = build_media_tokens(recipe.data, parent)
    placeholders = int((shards["train"] == (24 if parent == "tiny-voxtral" else 10)).sum())
    assert int(shards["train_offsets"][-1]) == placeholders == len(shards["train_features"])
    assert isinstance(load_model(student_dir), MediaLM)


def test_media_data_needs_a_media_parent(tmp_path: Path) -> None:
    raw = yaml.safe_load(RECIPES["tiny-voxtral"].read_text()) | {"parent": "tiny-mistral"}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    prepare(get_model("tiny-mistral"))
    with pytest.raises(RecipeError, match="needs an audio or vision parent"):
        plan_recipe(load_recipe(tmp_path / "r.yaml"))


def test_media_files_source_reads_transcriptions_and_conversations(tmp_path: Path) -> None:
    import soundfile

    t = np.arange(8000) / 16000
    soundfile.write(tmp_path / "a.wav", (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000)
    from PIL import Image

    Image.new("RGB", (16, 16), (255, 0, 0)).save(tmp_path / "red.png")
    (tmp_path / "data.jsonl").write_text(
        '{"audio": "a.wav", "text": "a tone", "language": "en"}\n'
        '{"messages": [{"role": "user", "content": [{"type": "audio", "path": "a.wav"}, {"type": "text", '
        '"text": "What is it?"}]}, {"role": "assistant", "content": "A tone."}]}\n'
        '{"audio": "../outside.wav", "text": "x"}\n')
    from distill.media_data import MediaDataError, MediaSourceConfig

    items = source_items(MediaSourceConfig(kind="files", paths=[str(tmp_path / "*.jsonl")]), 0)
    spec = get_model("tiny-voxtral")
    prepare(spec)  # in this module's own home: the test must not rely on an earlier one having made it
    tok = load_tokenizer(spec)
    ids, answer, audio, _ = render_item(next(items)[1], tok)
    assert ids.count(24) == 125 and tok.decode([i for i, a in zip(ids, answer, strict=True) if a]) == "a tone"
    ids, answer, audio, _ = render_item(next(items)[1], tok)
    assert len(audio) == 1 and tok.decode([i for i, a in zip(ids, answer, strict=True) if a]) == "A tone."
    with pytest.raises(MediaDataError, match="must stay inside"):
        next(items)


@pytest.mark.parametrize(("recipe", "lines"), [
    ("voxtral-mini-cascade.yaml", ["parent voxtral-mini-3b: 30 layers, hidden 3072, FFN 8192, heads 32/8 x 128",
                                   "audio encoder 32 layers x 1280 (adapter input: 4 frames), 637.0M params: copied, "
                                   "frozen", "stage 2 voxtral-mini-1b:"]),
    ("ministral-3-vision-cascade.yaml", ["parent ministral-3-8b-vision: 34 layers, hidden 4096, FFN 14336",
                                         "vision encoder 24 layers x 1024, patch 14: 403.3M params: copied, frozen",
                                         "stage 1 ministral-3-3b-vision-student: 26 layers, hidden 3072, FFN 9216"]),
])
def test_real_size_media_cascades_plan_from_their_configs(recipe: str, lines: list[str]) -> None:
    import subprocess
    import sys

    path = ROOT / "distill/recipes" / recipe
    out = subprocess.run([sys.executable, "-m", "distill", "cascade", str(path), "--dry-run"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    for line in lines:
        assert line in out.stdout, out.stdout
    run = subprocess.run([sys.executable, "-m", "distill", "cascade", str(path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 2 and "config-only entry" in run.stderr and "Traceback" not in run.stderr


def test_speech_source_needs_the_speech_demo(home: Path) -> None:
    from distill.media_data import MediaDataError, MediaSourceConfig

    with pytest.raises(MediaDataError, match="make speech-demo"):
        next(source_items(MediaSourceConfig(kind="speech"), 0))
