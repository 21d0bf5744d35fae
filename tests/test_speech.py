"""The speech demo's parts (distill/speech/): text and error rates, the Tekken re-pack of SmolLM2 (lossless), the
Voxtral-style assembly (the decoder still SmolLM2 on text), log-mel and CTC pieces, a short encoder run; the speech
synthesis and PocketSphinx baseline where their Debian packages are installed (`make speech-demo` needs them)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.speech.encoder import CHARS, CTCEncoder, encoder_config, greedy, targets, train_encoder
from distill.speech.text import is_held_out, normalise
from distill.speech.wer import edit_distance, error_rates
from models.registry import ModelSpec

HUMAN = Path("/usr/share/pocketsphinx/test/data")


def test_normalise_and_error_rates() -> None:
    assert normalise("He was NOT an ill-disposed  young man!") == "he was not an ill disposed young man"
    assert normalise("Is’t not your trick?") == "is't not your trick"
    assert edit_distance("a b c".split(), "a x c d".split()) == 2
    # "the cat sat" -> "the cat": 1 word, 4 characters deleted; "hello" -> "hello there": 1 word, 6 inserted
    assert error_rates(["the cat sat", "hello"], ["the cat", "Hello there"]) == {
        "wer": 0.5, "cer": round(10 / 16, 4), "words": 4, "clips": 2}
    assert is_held_out("some sentence") == is_held_out("some sentence")  # by text alone: the same split every run


def test_ctc_pieces() -> None:
    labels, lengths = targets(["Ab c", "d"])
    assert lengths.tolist() == [4, 1] and labels.tolist()[:2] == [CHARS.index("a") + 1, CHARS.index("b") + 1]
    classes = len(CHARS) + 1
    path = [0, 3, 3, 0, 3, 1, 1, 4, 0]  # blank a a blank a space space b blank -> "aa b"
    log_probs = torch.full((1, len(path), classes), -10.0)
    log_probs[0, torch.arange(len(path)), torch.tensor(path)] = 0.0
    assert greedy(log_probs) == ["aa b"]


def test_log_mel_matches_the_feature_extractor() -> None:
    from transformers import WhisperFeatureExtractor

    from models.audio import log_mel

    x = np.random.default_rng(0).standard_normal((2, 16000)).astype(np.float32) * 0.1
    ref = WhisperFeatureExtractor(feature_size=128)
    expected = np.stack([ref(a, sampling_rate=16000, return_tensors="np", padding=False).input_features[0]
                         for a in x])
    assert np.allclose(log_mel(torch.from_numpy(x)).numpy(), expected, atol=1e-5)


def test_tekken_repack_is_lossless(smollm2: ModelSpec, tmp_path: Path) -> None:
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer
    from tokenizers import Tokenizer

    from models.tekken_pack import NUM_SPECIALS, repack

    source = smollm2.checkpoint_dir / "tokenizer.json"
    id_map = repack(source, tmp_path / "tekken.json", {0: "<unk>", 1: "<s>", 2: "</s>"})
    tekken, hf = Tekkenizer.from_file(tmp_path / "tekken.json"), Tokenizer.from_file(str(source))
    new_of = {old: new for new, old in enumerate(id_map) if old is not None}
    texts = [Path(json.__file__).read_text()[:4000], "Ünïcödé — 你好 🙂\ttabs   and 12345 numbers\n\n  x",
             "and mister john dashwood had then leisure to consider"]
    for text in texts:
        ids = tekken.encode(text, bos=False, eos=False)
        assert ids == [new_of[i] for i in hf.encode(text, add_special_tokens=False).ids]
        assert tekken.decode(ids) == text
    assert id_map[:NUM_SPECIALS] == [None] * NUM_SPECIALS and tekken.n_words == len(id_map)


def test_assembled_model_keeps_smollm2_on_text(smollm2: ModelSpec, tmp_path: Path) -> None:
    """Around a fresh encoder, the assembled decoder is SmolLM2: the same logits on text (ids through the map)."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, VoxtralForConditionalGeneration

    from distill.speech.assemble import assemble
    from models.tokenizers import MistralChatTokenizer

    encoder = CTCEncoder(encoder_config(hidden=32, layers=1, heads=2)).encoder
    encoder.save_pretrained(tmp_path / "encoder")
    out = assemble(tmp_path / "encoder", smollm2.checkpoint_dir, tmp_path / "model")
    assert {"params.json", "consolidated.safetensors", "tekken.json", "config.json"} <= {p.name for p in out.iterdir()}
    model = VoxtralForConditionalGeneration.from_pretrained(out).eval()
    smol = AutoModelForCausalLM.from_pretrained(smollm2.checkpoint_dir).eval()

    text = "The capital of France is Paris, and"
    old = Tokenizer.from_file(str(smollm2.checkpoint_dir / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    new = MistralChatTokenizer(out).encode(text, add_special_tokens=False)

    with torch.no_grad():
        ours = model(input_ids=torch.tensor([new])).logits[0]
        theirs = smol(input_ids=torch.tensor([old])).logits[0]
    order = torch.tensor(new)
    assert torch.allclose(ours[:, order], theirs[:, torch.tensor(old)], atol=1e-4)
    # the transcription prompt renders with the audio section the tokenizer now has
    wav = _tone_wav(tmp_path / "a.wav", 1.0)
    ids, audio = MistralChatTokenizer(out).encode_transcription(wav.read_bytes(), "en")
    assert ids.count(24) == 64 and len(audio[0]) == 81920  # 5.12 s chunks at 12.5 Hz


def _tone_wav(path: Path, seconds: float) -> Path:
    import soundfile

    t = np.arange(int(seconds * 16000)) / 16000
    soundfile.write(path, (0.2 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), 16000)
    return path


def test_encoder_trains_and_writes_its_card(tmp_path: Path) -> None:
    (tmp_path / "clips").mkdir()
    lines = []
    for i, text in enumerate(["one two", "three", "four five six"]):
        _tone_wav(tmp_path / "clips" / f"{i}.wav", 0.5 + i * 0.3)
        lines.append(json.dumps({"audio": f"clips/{i}.wav", "text": text}))
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    card = train_encoder(tmp_path / "train.jsonl", tmp_path / "train.jsonl", tmp_path / "out", steps=3, batch=2,
                         progress=False)
    assert card["ctc"]["held_out"]["clips"] == 3 and 0 <= card["ctc"]["held_out"]["cer"]
    assert (tmp_path / "out" / "model.safetensors").is_file() and (tmp_path / "out" / "encoder-card.json").is_file()


needs_tts = pytest.mark.skipif(not (shutil.which("espeak-ng") and shutil.which("flite")),
                               reason="espeak-ng and flite (Debian packages) are not installed")


@needs_tts
def test_speech_synthesis_voices_and_degradation(tmp_path: Path) -> None:
    from distill.speech import synth

    voices = {v.key: v for v in synth.voices()}
    plan = [("he was not an ill disposed young man", voices[k]) for k in ("espeak:en-us+f3", "flite:slt")]
    records = synth.synthesise(tmp_path, plan, seed=0, max_seconds=5.12, progress=False)
    assert [r["voice"] for r in records] == ["espeak:en-us+f3", "flite:slt"]
    assert all(1.0 < r["seconds"] < 5.12 and (tmp_path / r["audio"]).is_file() for r in records)
    assert set(synth.HELD_OUT_VOICES) <= set(voices)


@pytest.mark.skipif(not HUMAN.is_dir(), reason="pocketsphinx-testdata (a Debian package) is not installed")
def test_pocketsphinx_baseline_on_a_human_clip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from distill.speech import report
    from distill.speech.demo import human_clips

    monkeypatch.setattr(report, "work_dir", lambda: tmp_path)
    (tmp_path / "data").mkdir()
    clips = human_clips(tmp_path / "data")
    assert len(clips) == 10 and clips[5]["text"] == "ten of clubs"
    assert report.pocketsphinx(clips[5:6]) == ["ten of clubs"]


def test_report_renders_every_number() -> None:
    from distill.speech.report import render

    rate = {"wer": 0.5, "cer": 0.25, "words": 10, "clips": 2, "examples": [{"ref": "a b", "hyp": "a"}] * 2}
    split = {"synthetic": rate, "human": rate, "chat": {"said": "a b", "reply": "a", "prompt_tokens": 80}}
    results = {
        "encoder": {"ctc": {"held_out": rate}, "params": 3.5e6, "steps": 10, "batch": 16, "train_seconds": 5,
                    "loss_first_20": 4.0, "loss_last_20": 2.0, "train_clips": 100},
        "model": split, "pocketsphinx": {"synthetic": rate, "human": rate},
        "stages": {"adapter": {"tokens": 100, "final": {"val_ce": 2.0}}, "tune": {"tokens": 100,
                                                                                 "final": {"val_ce": 1.5}}},
        "cascade": {"student": split, "card": {"name": "student", "params": 1.2e8, "train_seconds": 9,
                                               "pruned_only": {"val_kl": 0.5}, "final": {"val_kl": 0.2},
                                               "encoder": {"kept": "audio encoder ...: copied, frozen"}}},
    }
    text = render(results)
    assert "| voxtral-smollm2-135m (ours, via the server) | 0.500 / 0.250 | 0.500 / 0.250 |" in text
    assert "KL to parent 0.500 -> 0.200" in text and "PocketSphinx" in text
