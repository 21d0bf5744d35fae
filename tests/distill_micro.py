"""Random micro decoders for the distillation maths tests (milliseconds per step)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig


def micro_config(kind: str = "llama", tied: bool = False, **overrides: object):
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=tied,
                  rms_norm_eps=1e-6)
    common.update(overrides)
    if kind == "mistral":
        return MistralConfig(sliding_window=16, **common)
    return LlamaConfig(**common)


def micro_model(kind: str = "llama", tied: bool = False, seed: int = 0, **overrides: object):
    """A random model with non-trivial norm gains (so gain folding is actually exercised)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(micro_config(kind, tied, **overrides), dtype=torch.float64)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.5 + torch.rand_like(p))
            else:
                p.normal_(0, 0.2)
    model.config.use_cache = False
    return model.eval()


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


CORPUS_FILES = ("json/decoder.py", "json/encoder.py", "textwrap.py", "shlex.py", "string.py", "fnmatch.py")


def write_corpus(folder: Path) -> Path:
    """A few standard-library modules as a local text corpus (one document per file)."""
    import sysconfig

    folder.mkdir(parents=True, exist_ok=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in CORPUS_FILES:
        (folder / name.replace("/", "_")).write_text((stdlib / name).read_text())
    return folder


def write_micro_tokenizer(folder: Path, corpus: Path, vocab_size: int = 384) -> int:
    """A byte-level BPE trained on `corpus` (deterministic, < 1 s), saved with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((p.read_text() for p in sorted(corpus.iterdir())), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    fast.save_pretrained(folder)
    return tok.get_vocab_size()


def write_micro_checkpoint(folder: Path, corpus: Path, kind: str = "llama", tied: bool = True, seed: int = 0,
                           **overrides: object) -> Path:
    """A random micro model with its own small tokenizer: a complete checkpoint the distill CLI can use."""
    from distill.model_io import save_model

    tok_dir = folder.with_name(folder.name + "-tok")
    vocab = write_micro_tokenizer(tok_dir, corpus)
    model = micro_model(kind, tied, seed=seed, vocab_size=vocab, **overrides).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.mul_(0.25)  # gentler logits than micro_model's, so training moves them visibly
    return save_model(model, folder, tok_dir)


def micro_pair(base: Path, **overrides: object) -> dict[str, Path]:
    """A 4-layer teacher and a 2-layer student on one small stdlib corpus, and a CASCADE_HOME beside them: the
    setting every trainer test starts from (`overrides` go to both models, e.g. vLLM's head_dim)."""
    corpus = write_corpus(base / "corpus")
    teacher = write_micro_checkpoint(base / "teacher", corpus, seed=1, num_hidden_layers=4, **overrides)
    student = write_micro_checkpoint(base / "student", corpus, seed=2, num_hidden_layers=2, **overrides)
    return {"corpus": corpus, "teacher": teacher, "student": student, "home": base / "home"}


# a template with a generation prompt, whose turns end in the end-of-text token (as ChatML's <|im_end|>)
MICRO_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|endoftext|>\n{% endfor %}"
                  "{% if add_generation_prompt %}assistant: {% endif %}")


def chat_micro_pair(base: Path, **overrides: object) -> dict[str, Path]:
    """micro_pair with MICRO_TEMPLATE as both models' chat template (for chat data and preference pairs)."""
    from transformers import AutoTokenizer

    micro = micro_pair(base, **overrides)
    for model in (micro["teacher"], micro["student"]):
        tok = AutoTokenizer.from_pretrained(model)
        tok.chat_template = MICRO_TEMPLATE
        tok.save_pretrained(model)
    return micro
