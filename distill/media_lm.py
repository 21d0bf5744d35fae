"""Audio and vision models in distillation: the frozen encoder runs once, the projector and decoder train.

A Voxtral- or Mistral-3-style checkpoint is an encoder (Whisper-style audio, Pixtral ViT), a projector and a Mistral
decoder. In the cascade (as Ministral 3 does it) only the decoder is pruned; the encoder is copied verbatim and
frozen, and the projector is kept (rotated with the residual stream when the hidden size is cut) and trained with
the decoder. Since every model of a cascade shares the root parent's encoder, its outputs are computed once per
data item when the training data is built (`encode_media`) and read back by teacher and student alike: `MediaLM`
holds only the projector and decoder and takes those features as `media`.

Features are the projector's input, one row per placeholder token in the prompt:
  audio  [n, 4 d_enc]: the encoder's 50 Hz frames in groups of 4 (Voxtral's adapter input, 12.5 Hz)
  image  [n, 4 d_vit]: each 2x2 patch group in the patch merger's unfold order (channel-major), before its norm
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.mistral_format import write_native

MEDIA_TYPES = ("voxtral", "mistral3")
PROJECTOR = "model.multi_modal_projector."
ENCODERS = {"voxtral": "model.audio_tower.", "mistral3": "model.vision_tower."}
LANGUAGE_MODEL = "model.language_model."


def is_media_config(config: Any) -> bool:
    return getattr(config, "model_type", None) in MEDIA_TYPES


def media_class(model_type: str) -> Any:
    from transformers import Mistral3ForConditionalGeneration, VoxtralForConditionalGeneration

    return {"voxtral": VoxtralForConditionalGeneration, "mistral3": Mistral3ForConditionalGeneration}[model_type]


def placeholder_id(config: Any) -> int:
    return config.audio_token_id if config.model_type == "voxtral" else config.image_token_index


def load_full(path: Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    return media_class(config.model_type).from_pretrained(path, dtype=dtype)


class MediaDecoder(nn.Module):
    """Projector + decoder: token embeddings with the projected media features at the placeholder positions."""

    def __init__(self, full: nn.Module) -> None:
        super().__init__()
        self.projector = full.model.multi_modal_projector
        self.language_model = full.model.language_model
        self.kind = full.config.model_type
        self.token_id = placeholder_id(full.config)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                media: torch.Tensor | None = None) -> Any:
        embeds = self.language_model.embed_tokens(input_ids)
        if media is not None and len(media):
            where = input_ids == self.token_id  # [B, T]; features come in row-major placeholder order
            if int(where.sum()) != len(media):
                raise ValueError(f"{int(where.sum())} placeholder tokens but {len(media)} media feature rows")
            weight = next(self.projector.parameters())
            projected = self.project(media.to(weight.dtype))  # features are stored in float16
            embeds = embeds.masked_scatter(where[..., None], projected.to(embeds.dtype))
        return self.language_model(inputs_embeds=embeds, position_ids=position_ids)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        p = self.projector
        if self.kind == "voxtral":
            return p(features)
        n, width = features.shape
        d = width // 4  # 2x2 merge
        # [n, d*4] channel-major (unfold) -> [n, 4, d] to normalise each patch -> back, then merge and project
        patches = p.norm(features.view(n, d, 4).transpose(1, 2)).transpose(1, 2).reshape(n, width)
        return p.linear_2(p.act(p.linear_1(p.patch_merger.merging_layer(patches))))


class MediaLM(nn.Module):
    """What distillation trains of a multimodal model: `model` (projector + decoder, called like a decoder with an
    extra `media`), `lm_head` and the decoder's `config`. The frozen encoder's weights ride along untouched (not
    parameters: no gradients, no optimizer state) so the whole checkpoint can be written back."""

    def __init__(self, full: nn.Module) -> None:
        super().__init__()
        self.full_config = full.config
        self.config = full.config.text_config
        self.model = MediaDecoder(full)
        self.lm_head = full.lm_head
        prefix = ENCODERS[full.config.model_type]
        self.encoder_state = {k: v.detach().clone() for k, v in full.state_dict().items() if k.startswith(prefix)}

    def full_model(self) -> nn.Module:
        """The whole multimodal model (encoder included) with this projector and decoder."""
        full = media_class(self.full_config.model_type)(self.full_config)
        state = {**self.encoder_state, **{PROJECTOR + k: v for k, v in self.model.projector.state_dict().items()},
                 **{LANGUAGE_MODEL + k: v for k, v in self.model.language_model.state_dict().items()},
                 "lm_head.weight": self.lm_head.weight}
        full.load_state_dict({k: v.detach() for k, v in state.items()}, strict=True)
        return full

    def save(self, out: Path) -> None:
        """HF files (transformers) and Mistral's native ones (vLLM), into a directory being written atomically."""
        full = self.full_model()
        full.save_pretrained(out, safe_serialization=True)
        write_native(full, out, int(self.config.max_position_embeddings))


def encoder_params_of(config: Any) -> int:
    """The encoder's parameter count from the config alone (built on the meta device: no memory, no weights)."""
    with torch.device("meta"):
        full = media_class(config.model_type)(config)
    prefix = ENCODERS[config.model_type]
    return sum(v.numel() for k, v in full.state_dict().items() if k.startswith(prefix))


# ---------------------------------------------------------------------------------------------------------------
# the frozen encoder, run once per item


@torch.no_grad()
def encode_media(full: nn.Module, audio: list[Any], images: list[Any]) -> torch.Tensor:
    """Projector-input features [n placeholders, F] for one prompt's media (in prompt order), from the frozen
    encoder. `audio`: arrays as mistral_common padded them; `images`: its normalised [C, H, W] arrays."""
    kind = full.config.model_type
    if kind == "voxtral":
        if not audio:
            return torch.zeros(0, full.config.audio_config.intermediate_size)
        from models.audio import mel_chunks

        hidden = full.model.audio_tower(mel_chunks(audio, full.config)).last_hidden_state
        return hidden.reshape(-1, full.config.audio_config.intermediate_size).float()  # 4 frames a token
    merge = full.config.spatial_merge_size
    d = full.config.vision_config.hidden_size
    if not images:
        return torch.zeros(0, d * merge * merge)
    out = []
    for image in images:
        pixels = torch.as_tensor(image)[None].float()  # [1, C, H, W]
        size = torch.tensor([list(pixels.shape[-2:])])
        hidden = full.model.vision_tower(pixels, image_sizes=size, output_hidden_states=True).hidden_states[-1]
        h, w = (s // full.config.vision_config.patch_size for s in pixels.shape[-2:])
        grid = hidden.reshape(h, w, d).permute(2, 0, 1)[None]  # [1, d, h, w]
        # the patch merger's order: each 2x2 group's channels, channel-major
        out.append(torch.nn.functional.unfold(grid, kernel_size=merge, stride=merge).view(d * merge * merge, -1).t())
    return torch.cat(out).float()


# ---------------------------------------------------------------------------------------------------------------
# pruning: the decoder as a plain causal LM, the rest carried over


def split(full: nn.Module) -> tuple[Any, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(decoder config as a `MistralForCausalLM`, its state under that class's names, everything else)."""
    from transformers import MistralConfig

    text = full.config.text_config.to_dict()
    for key in ("model_type", "architectures", "transformers_version"):
        text.pop(key, None)
    lm_config = MistralConfig(**{**text, "sliding_window": None, "tie_word_embeddings": False})
    lm_state, rest = {}, {}
    for k, v in full.state_dict().items():
        if k.startswith(LANGUAGE_MODEL):
            lm_state["model." + k[len(LANGUAGE_MODEL):]] = v.detach().clone()
        elif k == "lm_head.weight":
            lm_state[k] = v.detach().clone()
        else:
            rest[k] = v.detach().clone()
    return lm_config, lm_state, rest


def join(full_config: Any, lm_config: Any, lm_state: dict[str, torch.Tensor], rest: dict[str, torch.Tensor],
         rotation: torch.Tensor | None = None) -> nn.Module:
    """The multimodal model around a pruned decoder. The projector writes into the residual stream as the token
    embeddings do, so under a hidden-size rotation Q [d, d'] its output layer becomes Q^T W2. Voxtral and Mistral 3
    also size the projector's inner layer by the decoder's width, so that layer is cut to d' channels as an FFN is:
    the channels with the largest |W1 row| x |W2 column| stay (the GELU between the layers rules out rotating them).
    At full rank this is exact; below it the projector is trained again with the decoder."""
    import copy

    config = copy.deepcopy(full_config)
    text = lm_config.to_dict()
    for key in ("model_type", "architectures", "transformers_version"):
        text.pop(key, None)
    config.text_config = type(full_config.text_config)(**{**full_config.text_config.to_dict(), **text})
    rest = dict(rest)
    if rotation is not None:
        q = rotation.double()
        w1, w2 = rest[PROJECTOR + "linear_1.weight"], rest[PROJECTOR + "linear_2.weight"]  # [d, in], [d, d]
        score = w1.double().norm(dim=1) * w2.double().norm(dim=0)
        keep = score.topk(q.shape[1]).indices.sort().values
        rest[PROJECTOR + "linear_1.weight"] = w1[keep].contiguous()  # [d', in]
        rest[PROJECTOR + "linear_2.weight"] = (q.T @ w2.double()[:, keep]).to(w2.dtype)  # [d', d']
        for bias in ("linear_1.bias", "linear_2.bias"):
            if PROJECTOR + bias in rest:
                raise ValueError("a projector with biases is not supported")
    full = media_class(config.model_type)(config)
    state = {**rest, **{LANGUAGE_MODEL + k[len("model."):]: v for k, v in lm_state.items() if k.startswith("model.")},
             "lm_head.weight": lm_state["lm_head.weight"]}
    full.load_state_dict(state, strict=True)
    return full


def describe_encoder(config: Any, params: int) -> str:
    if config.model_type == "voxtral":
        a = config.audio_config
        group = a.intermediate_size // a.hidden_size
        return (f"audio encoder {a.num_hidden_layers} layers x {a.hidden_size} (adapter input: {group} frames), "
                f"{params / 1e6:.1f}M params: copied, frozen")
    v = config.vision_config
    return (f"vision encoder {v.num_hidden_layers} layers x {v.hidden_size}, patch {v.patch_size}: "
            f"{params / 1e6:.1f}M params: copied, frozen")

