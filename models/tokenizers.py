"""One tokenizer interface over the two ways models render chat: HF jinja templates and mistral_common."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Protocol

from models.registry import ModelSpec

Message = dict[str, Any]  # OpenAI chat message, content already flattened to a string


_SPECIAL = re.compile(r"(\[/?[A-Z_]+\])")


class ChatTemplateError(ValueError):
    """The conversation cannot be rendered by this model's template (e.g. wrong role order for Mistral)."""


class ChatTokenizer(Protocol):
    eos_token_id: int
    supports_tools: bool
    vocab_size: int  # token ids at or above it do not exist
    max_token_chars: int  # the most characters one token decodes to (bounds tokens from text length)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, token_ids: list[int]) -> str: ...

    def info(self) -> dict[str, Any]:
        """What a remote client needs to tokenize like us (GET /tokenizer_info): vocab size, special tokens."""
        ...

    def encode_piece(self, text: str) -> list[int]:
        """Token ids for output text the server writes for the model (markers such as [THINK] as special tokens)."""
        ...

    def encode_chat(self, messages: list[Message], tools: list[dict[str, Any]] | None = None,
                    template_kwargs: dict[str, Any] | None = None) -> list[int]:
        """A prompt: the conversation so far, then the opening of the assistant's turn."""
        ...

    def encode_conversation(self, messages: list[Message], tools: list[dict[str, Any]] | None = None,
                            template_kwargs: dict[str, Any] | None = None) -> list[int]:
        """A finished conversation ending with the assistant's answer, as training text (no new turn opened)."""
        ...


class HFChatTokenizer:
    """A transformers tokenizer whose own jinja chat template renders conversations."""

    def __init__(self, path: Path) -> None:
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path)
        if not self.tok.chat_template:
            raise ChatTemplateError(f"{path}: tokenizer has no chat template")
        self.eos_token_id = int(self.tok.eos_token_id)
        # Templates that know tools read a `tools` variable; others (SmolLM2's) get them as text (serve/tools.py).
        self.supports_tools = "tools" in self.tok.chat_template
        self.vocab_size = len(self.tok)
        # Byte-level BPE spells each byte as one character, so a token string's length bounds its decoded length.
        self.max_token_chars = max(len(t) for t in self.tok.get_vocab())

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=add_special_tokens))

    def encode_piece(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def decode(self, token_ids: list[int]) -> str:
        return self.tok.decode(token_ids)

    def info(self) -> dict[str, Any]:
        return {"tokenizer_class": type(self.tok).__name__, "vocab_size": len(self.tok),
                "bos_token": self.tok.bos_token, "eos_token": self.tok.eos_token, "pad_token": self.tok.pad_token,
                "chat_template": self.tok.chat_template}

    def encode_chat(self, messages: list[Message], tools: list[dict[str, Any]] | None = None,
                    template_kwargs: dict[str, Any] | None = None) -> list[int]:
        return self._render(messages, tools, template_kwargs, add_generation_prompt=True)

    def encode_conversation(self, messages: list[Message], tools: list[dict[str, Any]] | None = None,
                            template_kwargs: dict[str, Any] | None = None) -> list[int]:
        return self._render(messages, tools, template_kwargs, add_generation_prompt=False)

    def _render(self, messages: list[Message], tools: list[dict[str, Any]] | None,
                template_kwargs: dict[str, Any] | None, add_generation_prompt: bool) -> list[int]:
        try:
            out = self.tok.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                               tokenize=True, return_dict=True, **(template_kwargs or {}))
        except Exception as e:  # jinja raises TemplateError, UndefinedError, TypeError... all mean "bad messages"
            raise ChatTemplateError(f"chat template failed: {e}") from e
        return list(out["input_ids"])


class MistralChatTokenizer:
    """mistral_common renders Mistral chats (control tokens such as [INST] are not text a template can fake)."""

    def __init__(self, path: Path) -> None:
        from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

        self._file = str(path / "tekken.json")
        self.mistral = MistralTokenizer.from_file(self._file)
        self._finetuning: MistralTokenizer | None = None  # made on first use: only training data needs it
        self.raw = self.mistral.instruct_tokenizer.tokenizer
        self.eos_token_id = int(self.raw.eos_id)
        self.supports_tools = True
        self.vocab_size = int(self.raw.n_words)
        self.max_token_chars = max(len(self.raw.id_to_byte_piece(i, SpecialTokenPolicy.KEEP))
                                   for i in range(self.vocab_size))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.raw.encode(text, bos=add_special_tokens, eos=False))

    def encode_piece(self, text: str) -> list[int]:
        ids: list[int] = []
        for part in _SPECIAL.split(text):  # the capture group keeps the [MARKER]s as their own parts
            if not part:
                continue
            try:
                ids.append(int(self.raw.get_special_token(part)))
            except Exception:  # noqa: BLE001 - not a special token of this vocabulary: plain text
                ids += self.raw.encode(part, bos=False, eos=False)
        return ids

    def decode(self, token_ids: list[int]) -> str:
        return self.raw.decode(token_ids)

    def info(self) -> dict[str, Any]:
        # mistral_common renders chats itself: there is no jinja template to hand out.
        return {"tokenizer_class": type(self.raw).__name__, "vocab_size": int(self.raw.n_words),
                "bos_token": self.raw.id_to_piece(self.raw.bos_id), "eos_token": self.raw.id_to_piece(self.raw.eos_id),
                "pad_token": None, "chat_template": None}

    def encode_chat(self, messages: list[Message], tools: list[dict[str, Any]] | None = None,
                    template_kwargs: dict[str, Any] | None = None) -> list[int]:
        return self._render(self.mistral, messages, tools, template_kwargs)

    def encode_chat_media(self, messages: list[Message], tools: list[dict[str, Any]] | None = None,
                          template_kwargs: dict[str, Any] | None = None) -> tuple[list[int], list[Any], list[Any]]:
        """(prompt ids, audio arrays, images) from one mistral_common call: the [AUDIO]/[IMG] placeholders it writes
        match the media it returns (vLLM does not check the count for audio). Audio comes back resampled to the
        tokenizer's rate and padded to whole chunks, as the encoder takes it."""
        encoded = self._encoded(self.mistral, messages, tools, template_kwargs)
        return list(encoded.tokens), [a.audio_array for a in encoded.audios], list(encoded.images)

    def encode_conversation_media(self, messages: list[Message], tools: list[dict[str, Any]] | None = None,
                                  template_kwargs: dict[str, Any] | None = None
                                  ) -> tuple[list[int], list[Any], list[Any]]:
        """A finished conversation with media, as training data: (ids closed by EOS, audio arrays, images)."""
        encoded = self._encoded(self._finetuning_tokenizer(), messages, tools, template_kwargs)
        return list(encoded.tokens), [a.audio_array for a in encoded.audios], list(encoded.images)

    def audio_rate(self) -> int | None:
        """The sampling rate audio is resampled to, or None for a tokenizer without an audio section."""
        config = self.raw.audio
        return None if config is None else int(config.sampling_rate)

    def encode_transcription(self, audio: bytes, language: str | None) -> tuple[list[int], list[Any]]:
        """`[INST][BEGIN_AUDIO][AUDIO]...[/INST]lang:xx[TRANSCRIBE]`: Voxtral's transcription mode, no text prompt.
        `audio` is an audio file's bytes; `language` an ISO-639-1 code (pydantic refuses others)."""
        from mistral_common.protocol.transcription.request import TranscriptionRequest

        request = TranscriptionRequest(audio=audio, language=language)
        encoded = self.mistral.instruct_tokenizer.encode_transcription(request)
        return list(encoded.tokens), [a.audio_array for a in encoded.audios]

    def encode_conversation(self, messages: list[Message], tools: list[dict[str, Any]] | None = None,
                            template_kwargs: dict[str, Any] | None = None) -> list[int]:
        """mistral_common's fine-tuning mode accepts (and closes with EOS) a final assistant message."""
        return self._render(self._finetuning_tokenizer(), messages, tools, template_kwargs)

    def _finetuning_tokenizer(self) -> Any:
        """The fine-tuning-mode tokenizer, made on first use (only training data needs it)."""
        from mistral_common.protocol.instruct.validator import ValidationMode
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

        if self._finetuning is None:
            self._finetuning = MistralTokenizer.from_file(self._file, mode=ValidationMode.finetuning)
        return self._finetuning

    @classmethod
    def _render(cls, tokenizer: Any, messages: list[Message], tools: list[dict[str, Any]] | None,
                template_kwargs: dict[str, Any] | None) -> list[int]:
        return list(cls._encoded(tokenizer, messages, tools, template_kwargs).tokens)

    @staticmethod
    def _encoded(tokenizer: Any, messages: list[Message], tools: list[dict[str, Any]] | None,
                 template_kwargs: dict[str, Any] | None) -> Any:
        from mistral_common.protocol.instruct.request import ChatCompletionRequest

        try:
            request = ChatCompletionRequest.from_openai(messages, tools=tools, **(template_kwargs or {}))
            return tokenizer.encode_chat_completion(request)
        except Exception as e:  # pydantic ValidationError, InvalidMessageStructureException, ...
            raise ChatTemplateError(str(e).splitlines()[0]) from e


def tokenizer_vocab(path: Path) -> list[str]:
    """Token strings by id: from tokenizer.json (HF) or tekken.json (Mistral)."""
    import json

    if (path / "tokenizer.json").is_file():
        data = json.loads((path / "tokenizer.json").read_text())
        pieces = {int(i): t for t, i in data["model"]["vocab"].items()}
        pieces |= {int(t["id"]): t["content"] for t in data.get("added_tokens", [])}
    elif (path / "tekken.json").is_file():
        data = json.loads((path / "tekken.json").read_text())
        specials = data.get("special_tokens") or []
        pieces = {int(t["rank"]): t["token_str"] for t in specials}
        offset = int(data.get("config", {}).get("default_num_special_tokens", len(specials)))
        pieces |= {offset + i: t.get("token_str") or t["token_bytes"] for i, t in enumerate(data["vocab"])}
    else:
        raise ChatTemplateError(f"{path}: no tokenizer.json or tekken.json")
    return [pieces.get(i, "") for i in range(max(pieces) + 1)]


def load_tokenizer(spec: ModelSpec) -> ChatTokenizer:
    path = spec.checkpoint_dir
    if spec.chat_format == "mistral":
        return MistralChatTokenizer(path)
    return HFChatTokenizer(path)
