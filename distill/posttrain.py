"""Post-training recipes: `python -m distill sft|prefer RECIPE.yaml` (and `make posttrain POSTTRAIN_RECIPE=...`).

A recipe names the model to start from (registry name or checkpoint), an optional teacher, chat data (sft) or
preference pairs (prefer) and the train settings; the run is the component trainer with the recipe's objective
(distill/objectives/), resumed from its last
checkpoint after an interruption, then exported with a model card and registered under the recipe's name so
`python -m serve --model NAME` and the evals can use it. A finished run with the same settings is not redone.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator

from distill.chat_data import ChatDataConfig
from distill.common import barrier, is_rank0
from distill.components.metrics import read_metrics
from distill.config import (
    TrainConfig,
    TrainSettings,
    data_format,
    read_yaml,
    run_settings,
    same_settings,
    validation_problems,
)
from distill.data import load_splits
from distill.model_io import load_config
from distill.pair_data import PairDataConfig
from distill.train import Trainer
from models.checkpoint import weights_state
from models.prepare import prepare
from models.registry import REGISTRY, ReasoningFormat, cascade_home, get_model, register_model

Objective = Literal["sft", "prefer", "grpo"]
DATA_FORMAT = {"sft": "chat", "prefer": "pairs", "grpo": "chat"}


class PostTrainError(ValueError):
    pass


class PostTrainRecipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$", description="registry name of the trained model")
    model: str = Field(description="registry name or checkpoint directory to start from")
    teacher: str | None = Field(None, description="registry name or checkpoint of a teacher for logit distillation")
    data: Annotated[Annotated[ChatDataConfig, Tag("chat")] | Annotated[PairDataConfig, Tag("pairs")],
                    Discriminator(data_format)]
    epochs: float | None = Field(None, gt=0, description="passes over the training rows (or give tokens)")
    tokens: int | None = Field(None, gt=0, description="training tokens (rows x seq_len), instead of epochs")
    train: TrainSettings = TrainSettings(objective="sft")
    seed: int = 0
    after: str | None = Field(None, description="a recipe (path relative to this one's folder) that makes this "
                              "one's `model`: it runs first (a no-op once done), e.g. a cold-start SFT before GRPO")
    reasoning_format: ReasoningFormat | None = Field(
        None, description="register the result with this reasoning format (the server splits its thinking from "
                          "its answer); default: the starting model's")

    @model_validator(mode="after")
    def _budget(self) -> PostTrainRecipe:
        if (self.epochs is None) == (self.tokens is None):
            raise ValueError("give exactly one of epochs and tokens")
        if self.name in REGISTRY:
            raise ValueError(f"name {self.name!r} is a built-in model; choose another for the trained model")
        return self


def load_posttrain_recipe(path: Path, objective: Objective | None) -> PostTrainRecipe:
    """Read and check a recipe before any work; every problem names its key. `objective` is the command's (None:
    the recipe's own train.objective, default sft)."""
    raw = read_yaml(path, PostTrainError)
    train = raw.setdefault("train", {}) or {}
    if not isinstance(train, dict):
        raise PostTrainError(f"{path}: train: must be a mapping")
    given = train.setdefault("objective", objective or "sft")
    if given not in DATA_FORMAT or (objective is not None and given != objective):
        runs = objective or " or ".join(DATA_FORMAT)
        raise PostTrainError(f"{path}: train.objective is {given!r}; this command runs {runs}")
    raw["train"] = train
    if isinstance(raw.get("data"), dict):
        raw["data"].setdefault("format", DATA_FORMAT[given])
        if given == "grpo":  # prompts come one conversation a row
            raw["data"].setdefault("packing", False)
    try:
        recipe = PostTrainRecipe.model_validate(raw)
        # the run's own rules (sft needs chat data, a teacher for teacher_weight > 0...) before any model is prepared
        TrainConfig.model_validate({**dict(recipe.train), "student": recipe.model, "teacher": recipe.teacher,
                                    "out_dir": "unused", "data": recipe.data, "tokens": 1, "seed": recipe.seed})
    except ValidationError as e:
        raise PostTrainError(f"{path}: {validation_problems(e, 'recipe')}") from e
    return recipe


def load_recipe_chain(path: Path, objective: Objective | None) -> list[PostTrainRecipe]:
    """The recipe and those it runs `after`, first to last; each later one must start from its predecessor."""
    chain = [load_posttrain_recipe(path, objective)]
    seen = {path.resolve()}
    while chain[0].after is not None:
        before = (path.parent / chain[0].after).resolve()
        if before in seen:
            raise PostTrainError(f"{path}: the recipes' `after` entries go round in a circle at {before}")
        seen.add(before)
        previous = load_posttrain_recipe(before, None)
        if chain[0].model != previous.name:
            raise PostTrainError(f"{path}: runs after {chain[0].after}, so its model must be that recipe's result "
                                 f"{previous.name!r}, not {chain[0].model!r}")
        chain.insert(0, previous)
        path = before
    return chain


def _checkpoint(name: str) -> Path:
    return prepare(get_model(name))


def run_config(recipe: PostTrainRecipe, runs: Path | None = None) -> TrainConfig:
    """The recipe as one run's TrainConfig (also checks the run's own rules before any work)."""
    student = _checkpoint(recipe.model)
    teacher = _checkpoint(recipe.teacher) if recipe.teacher else None
    # rendered as the model is served: its registry entry's template and tool/reasoning formats
    data = recipe.data if recipe.data.template else recipe.data.model_copy(update={"template": recipe.model})
    if recipe.tokens is not None:
        tokens = recipe.tokens
    else:
        if is_rank0():  # one process renders and caches the rows, the others read them
            load_splits(data, data.template)  # type: ignore[arg-type]
        barrier()
        train, _ = load_splits(data, data.template)  # type: ignore[arg-type]
        tokens = math.ceil(recipe.epochs * len(train)) * train.ids[0].numel()  # type: ignore[operator]
    out = (runs or cascade_home() / "runs" / recipe.name) / "train"
    try:
        return TrainConfig.model_validate({**dict(recipe.train), "student": str(student),
                                           "teacher": str(teacher) if teacher else None, "out_dir": str(out),
                                           "data": data, "tokens": tokens, "seed": recipe.seed})
    except ValidationError as e:
        raise PostTrainError(f"recipe {recipe.name}: {validation_problems(e, 'train')}") from e


def run_posttrain(recipe: PostTrainRecipe, runs: Path | None = None, progress: bool = True,
                  register: bool = True) -> dict:
    """Train (resuming), export, write the card, register (or, `register=False` as benchmarks do, export beside the
    run only); returns the card."""
    config = run_config(recipe, runs)
    out = cascade_home() / "models" / recipe.name if register else Path(config.out_dir).parent / "model"
    card = _finished(out / "cascade-card.json", config)
    if card is not None:
        if is_rank0():
            print(f"{recipe.name}: already done ({out})")
    else:
        trainer = Trainer(config, progress=progress)
        final = trainer.train(resume=True)
        metrics = read_metrics(Path(config.out_dir) / "metrics.jsonl") if is_rank0() else []
        card = {"name": recipe.name, "objective": config.objective, "start": config.student,
                "start_weights": weights_state(Path(config.student)), "model": recipe.model,
                "teacher": recipe.teacher, "teacher_weight": config.sft.weight(config.teacher is not None),
                "prefer": config.prefer.model_dump() if config.objective == "prefer" else None,
                "grpo": config.grpo.model_dump() if config.objective == "grpo" else None,
                "data": recipe.data.model_dump(), "tokens_seen": trainer.step * trainer.tokens_per_step,
                "steps": trainer.step, "before": metrics[0] if metrics else {}, "final": final,
                "train_seconds": round(trainer.elapsed, 1), "train_config": run_settings(config)}
        trainer.export(out, card)
        if is_rank0():
            # the exported model and its card are the result; a finished run's checkpoints (the weights and
            # optimizer state, ~12 bytes a parameter each) are never read again: "already done" reads the card
            shutil.rmtree(Path(config.out_dir) / "checkpoints", ignore_errors=True)
            (out / "README.md").write_text(model_card(card))
            before = card["before"]
            print(f"{recipe.name}: held-out CE {before.get('val_ce', float('nan')):.3f} -> {final['val_ce']:.3f}"
                  + (f", KL to the teacher {before['val_kl']:.3f} -> {final['val_kl']:.3f}"
                     if "val_kl" in final and "val_kl" in before else "")
                  + (f", held-out preference accuracy {before['val_reward_accuracy']:.3f} -> "
                     f"{final['val_reward_accuracy']:.3f}" if "val_reward_accuracy" in before else "")
                  + (f", held-out greedy reward {before['val_reward']:.3f} -> {final['val_reward']:.3f}"
                     if "val_reward" in before else "") + f" ({out})")
    if is_rank0() and register:
        base = get_model(recipe.model)
        family = load_config(out).model_type
        register_model(dataclasses.replace(
            base, name=recipe.name, source="local", path=out,
            family=family if family in ("llama", "mistral", "ministral3") else base.family,
            reasoning_format=recipe.reasoning_format or base.reasoning_format,
            description=f"{base.name} post-trained ({config.objective}) by the recipe {recipe.name}",
            draft_for=None))
        print(f"registered as {recipe.name}: python -m serve --model {recipe.name}")
    barrier()
    return card | {"path": str(out)}


def _finished(card_path: Path, config: TrainConfig) -> dict | None:
    """The card of an earlier run from the same weights with the same settings (settings added since at their
    defaults)."""
    if not card_path.is_file():
        return None
    card = json.loads(card_path.read_text())
    same = card.get("start") == config.student and card.get("start_weights") == weights_state(
        Path(config.student)) and same_settings(
        card.get("train_config"), run_settings(config), run_settings(config, defaults=False))
    return card if same else None


def model_card(card: dict) -> str:
    before, after = card["before"], card["final"]
    rows = [("cross-entropy per assistant token" + (" (chosen answers)" if card.get("prefer") else ""), "val_ce",
             ".4f"), ("perplexity", "val_ppl", ".2f"),
            ("KL(teacher ‖ model) per assistant token", "val_kl", ".4f"),
            ("top-1 agreement with the teacher", "val_top1_agree", ".3f"),
            ("pairs ranked right (delta > 0)", "val_reward_accuracy", ".3f"),
            ("margin beta x delta", "val_margin", ".3f"), ("preference loss", "val_loss", ".4f"),
            ("greedy answers' reward", "val_reward", ".3f"),
            *((f"greedy answers' {t['name']} score", f"val_reward_{t['name']}", ".3f")
              for t in (card.get("grpo") or {}).get("rewards", []))]
    table = [f"| {label} | {before.get(key, float('nan')):{fmt}} | {after[key]:{fmt}} |"
             for label, key, fmt in rows if key in after]
    return "\n".join([
        f"# {card['name']}", "",
        f"`{card['model']}` post-trained with objective `{card['objective']}`"
        + (f", logit distillation from `{card['teacher']}` (weight {card['teacher_weight']:g})"
           if card["teacher"] else "")
        + (f", GPO {card['prefer']['loss']} at beta {card['prefer']['beta']:g}" if card.get("prefer") else "")
        + (f", GRPO with {card['grpo']['group_size']} samples a prompt" if card.get("grpo") else "") + ".",
        "",
        f"- Tokens seen: {card['tokens_seen']:,} in {card['steps']} steps ({card['train_seconds']} s)", "",
        "| held-out conversations | before | after |", "|---|---|---|", *table, "",
        f"Data: {json.dumps(card['data'])}", "",
    ])
