"""What the speech demo measured: word error rates of voxtral-smollm2-135m through our server (vLLM engine, the
official openai client's `audio.transcriptions`), of PocketSphinx on the same clips, of the encoder's own CTC head,
then the cascade (distill/recipes/voxtral-smollm2-cascade.yaml: the decoder pruned, encoder kept) and its student's
rates. Writes docs/speech-demo.md and docs/bench/speech/results.json."""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from distill.speech.demo import MODEL, DemoConfig, work_dir
from distill.speech.wer import error_rates
from models.registry import get_model

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[2]
CASCADE = ROOT / "distill" / "recipes" / "voxtral-smollm2-cascade.yaml"
SPLITS = {"synthetic": ("test-synthetic.jsonl", "held-out voices (flite slt, espeak-ng en-029+f2) and sentences"),
          "human": ("test-human.jsonl", "pocketsphinx-testdata: 5 LibriVox readings of Austen, 5 card names")}


def records(split: str) -> list[dict]:
    path = work_dir() / "data" / SPLITS[split][0]
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def transcribe(base_url: str, model: str, clips: list[dict], workers: int = 4) -> list[str]:
    """Greedy transcripts through the server, a few requests at a time (the engine batches them)."""
    import openai

    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=600)
    data = work_dir() / "data"

    def one(record: dict) -> str:
        path = data / record["audio"]
        return client.audio.transcriptions.create(model=model, file=(path.name, path.read_bytes()),
                                                  language="en", extra_body={"max_completion_tokens": 48}).text

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, clips))


def pocketsphinx(clips: list[dict]) -> list[str]:
    """CMU PocketSphinx with the en-us acoustic model and language model in its wheel, on the same 16 kHz clips."""
    import numpy as np
    import soundfile
    from pocketsphinx import Decoder

    decoder = Decoder(samprate=16000, loglevel="FATAL")
    out = []
    for record in clips:
        samples, rate = soundfile.read(work_dir() / "data" / record["audio"], dtype="float32")
        if rate != 16000:
            raise ValueError(f"{record['audio']}: {rate} Hz")
        decoder.start_utt()
        decoder.process_raw((np.clip(samples, -1, 1) * 32767).astype(np.int16).tobytes(), full_utt=True)
        decoder.end_utt()
        out.append(decoder.hyp().hypstr if decoder.hyp() is not None else "")
    return out


def chat_example(base_url: str, model: str) -> dict:
    """One chat turn with an `input_audio` part through the official client: the first held-out clip."""
    import base64

    import openai

    clip = records("synthetic")[0]
    audio = base64.b64encode((work_dir() / "data" / clip["audio"]).read_bytes()).decode()
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=600)
    reply = client.chat.completions.create(model=model, max_tokens=32, messages=[{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": audio, "format": "flac"}},
        {"type": "text", "text": "What is said in this recording?"}]}])
    return {"said": clip["text"], "reply": reply.choices[0].message.content,
            "prompt_tokens": reply.usage.prompt_tokens}


def measure(model: str, log_dir: Path) -> dict:
    from eval.harness import served

    spec = get_model(model)
    out: dict = {}
    with served(spec, log_dir, ("--enforce-eager",)) as url:  # no torch.compile: minutes saved on 2 cores
        out["chat"] = chat_example(url, model)
        for split in SPLITS:
            clips = records(split)
            start = time.monotonic()
            hyps = transcribe(url, model, clips)
            out[split] = error_rates([c["text"] for c in clips], hyps) | {
                "seconds": round(time.monotonic() - start, 1),
                "examples": [{"ref": c["text"], "hyp": h} for c, h in list(zip(clips, hyps, strict=True))[:4]]}
    return out


def report(config: DemoConfig, docs: Path = ROOT / "docs") -> str:
    from distill.cascade import load_recipe, run_recipe

    logs = work_dir() / "report"
    logs.mkdir(parents=True, exist_ok=True)
    results: dict = {"config": config.__dict__, "date": time.strftime("%Y-%m-%d")}
    card_path = work_dir() / "encoder" / "encoder-card.json"
    results["encoder"] = json.loads(card_path.read_text())
    results["pocketsphinx"] = {split: error_rates([c["text"] for c in records(split)], pocketsphinx(records(split)))
                               for split in SPLITS}
    results["model"] = measure(MODEL, logs)
    results["stages"] = {stage: json.loads((path / "cascade-card.json").read_text())
                         for stage, path in (("adapter", work_dir() / "adapter"),
                                             ("tune", get_model(MODEL).checkpoint_dir))}
    card = run_recipe(load_recipe(CASCADE), progress=False)[0]
    results["cascade"] = {"card": {k: card[k] for k in ("name", "params", "architecture", "pruned_only", "final",
                                                        "train_seconds", "encoder", "projector")},
                          "student": measure(card["name"], logs)}
    out = docs / "bench" / "speech"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    text = render(results)
    (docs / "speech-demo.md").write_text(text)
    return text


def _rate(r: dict) -> str:
    return f"{r['wer']:.3f} / {r['cer']:.3f}"


def render(results: dict) -> str:
    model, student, sphinx = results["model"], results["cascade"]["student"], results["pocketsphinx"]
    card = results["cascade"]["card"]
    enc = results["encoder"]
    lines = [
        "# Speech demo: a small Voxtral-style model from real parts", "",
        "Made and measured by `make speech-demo` (distill/speech/). Word / character error rates (corpus rates: "
        "edit distance summed over a split, divided by its words or characters) on text normalised to lower-case "
        "words. Numbers from one run on 2 CPU cores.", "",
        "| system | synthetic held-out WER / CER | human WER / CER |", "|---|---|---|",
        f"| encoder alone (CTC head, greedy) | {_rate(enc['ctc']['held_out'])} | - (clips over 5.12 s) |",
        f"| voxtral-smollm2-135m (ours, via the server) | {_rate(model['synthetic'])} | {_rate(model['human'])} |",
        f"| cascade student {card['name']} ({card['params'] / 1e6:.0f}M decoder) | {_rate(student['synthetic'])} | "
        f"{_rate(student['human'])} |",
        f"| PocketSphinx 5.1.1 (en-us model in its wheel) | {_rate(sphinx['synthetic'])} | {_rate(sphinx['human'])} |",
        "",
        f"- synthetic: {model['synthetic']['clips']} clips, {model['synthetic']['words']} words: "
        f"{SPLITS['synthetic'][1]}",
        f"- human: {model['human']['clips']} clips, {model['human']['words']} words: {SPLITS['human'][1]}; with ~100 "
        "words one clip moves the rate by several points",
        "", "## Examples (first clips of each split)", "",
    ]
    for name, rows in (("voxtral-smollm2-135m", model), (card["name"], student)):
        for split in SPLITS:
            for ex in rows[split]["examples"][:2]:
                lines.append(f"- {name}, {split}: `{ex['ref']}` -> `{ex['hyp']}`")
    for name, rows in (("voxtral-smollm2-135m", model), (card["name"], student)):
        chat = rows["chat"]
        lines.append(f"- chat with an `input_audio` part ({chat['prompt_tokens']} prompt tokens), {name}: "
                     f"\"What is said in this recording?\" about `{chat['said']}` -> `{chat['reply']}`")
    lines += ["", "## Reading the numbers", ""]
    lines.append(f"- The encoder alone, greedy CTC on characters, gets {1 - enc['ctc']['held_out']['cer']:.0%} of the "
                 "held-out characters right in voices it never heard: the audio information is there.")
    if model["synthetic"]["wer"] >= 0.9:
        lines.append(f"- The Voxtral-style model does not read the audio yet: its transcripts are fluent text of the "
                     f"training transcripts' kind, not the clip's words (WER {model['synthetic']['wer']:.2f}, above 1 "
                     "when it writes more words than were said). After "
                     f"{results['stages']['adapter']['tokens'] + results['stages']['tune']['tokens']:,} tokens of "
                     "stage 2 (about 20 minutes of CPU) the decoder has learned the transcripts' language (held-out "
                     f"CE {results['stages']['tune']['final']['val_ce']:.2f} nats per transcript token) but not the "
                     "mapping from the adapter's 12.5 Hz frames; Voxtral's adapter stage runs for many hours on GPUs.")
    lines.append(f"- PocketSphinx, a complete recogniser with a language model built for English, does far better on "
                 f"the human clips (WER {sphinx['human']['wer']:.2f}) than on the synthetic voices "
                 f"({sphinx['synthetic']['wer']:.2f}): TTS speech is out of its domain as human speech is out of "
                 "ours.")
    lines.append(f"- The cascade keeps the parent's behaviour on its own data (KL to the parent "
                 f"{card['pruned_only'].get('val_kl', 0):.3f} -> {card['final'].get('val_kl', 0):.3f} per text token) "
                 "with the encoder untouched; with a parent that does not transcribe, WER cannot show what it keeps.")
    lines += ["", "## How it was made", "",
              f"- encoder: {enc['params'] / 1e6:.1f}M params, {enc['steps']} CTC steps x {enc['batch']} clips "
              f"({enc['train_seconds']} s; loss {enc['loss_first_20']} -> {enc['loss_last_20']}) on "
              f"{enc['train_clips']} clips",
              f"- adapter stage (decoder frozen): {results['stages']['adapter']['tokens']:,} tokens, held-out CE "
              f"{results['stages']['adapter']['final']['val_ce']:.3f}",
              f"- tune stage (adapter + decoder): {results['stages']['tune']['tokens']:,} tokens, held-out CE "
              f"{results['stages']['tune']['final']['val_ce']:.3f}",
              f"- cascade: decoder pruned to {card['params'] / 1e6:.1f}M and distilled from the parent with the "
              f"audio in context ({card['train_seconds']} s): KL to parent {card['pruned_only'].get('val_kl', 0):.3f}"
              f" -> {card['final'].get('val_kl', 0):.3f}; {card['encoder']['kept']}", ""]
    return "\n".join(lines)
