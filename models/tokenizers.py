"""One tokenizer interface over the two ways models render chat: HF jinja templates and mistral_common."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from models.registry import ModelSpec

Message = dict[str, Any]  # OpenAI chat message, content already flattened to a string


class ChatTemplateError(ValueError):
    """The conversation cannot be rendered by this model's template (e.g. wrong role order for Mistral)."""


class ChatTokenizer(Protocol):
    eos_token_id: int

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, token_ids: list[int]) -> str: ...

    def encode_chat(self, messages: list[Message]) -> list[int]: ...


class HFChatTokenizer:
    """A transformers tokenizer whose own jinja chat template renders conversations."""

    def __init__(self, path: Path) -> None:
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path)
        if not self.tok.chat_template:
            raise ChatTemplateError(f"{path}: tokenizer has no chat template")
        self.eos_token_id = int(self.tok.eos_token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, token_ids: list[int]) -> str:
        return self.tok.decode(token_ids)

    def encode_chat(self, messages: list[Message]) -> list[int]:
        try:
            out = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        except Exception as e:  # jinja raises TemplateError, UndefinedError, TypeError... all mean "bad messages"
            raise ChatTemplateError(f"chat template failed: {e}") from e
        return list(out["input_ids"])


class MistralChatTokenizer:
    """mistral_common renders Mistral chats (control tokens such as [INST] are not text a template can fake)."""

    def __init__(self, path: Path) -> None:
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

        self.mistral = MistralTokenizer.from_file(str(path / "tekken.json"))
        self.raw = self.mistral.instruct_tokenizer.tokenizer
        self.eos_token_id = int(self.raw.eos_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.raw.encode(text, bos=add_special_tokens, eos=False))

    def decode(self, token_ids: list[int]) -> str:
        return self.raw.decode(token_ids)

    def encode_chat(self, messages: list[Message]) -> list[int]:
        from mistral_common.protocol.instruct.request import ChatCompletionRequest

        try:
            request = ChatCompletionRequest.from_openai(messages)
            return list(self.mistral.encode_chat_completion(request).tokens)
        except Exception as e:  # pydantic ValidationError, InvalidMessageStructureException, ...
            raise ChatTemplateError(str(e).splitlines()[0]) from e


def load_tokenizer(spec: ModelSpec) -> ChatTokenizer:
    path = spec.checkpoint_dir
    if spec.chat_format == "mistral":
        return MistralChatTokenizer(path)
    return HFChatTokenizer(path)
