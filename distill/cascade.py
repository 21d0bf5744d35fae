"""Cascade recipes: prune the parent, distill, evaluate, register; then prune that child for the next stage.

As in Ministral 3, each stage starts from the previous stage's student (the first from the parent) and is
distilled from the root parent by default (`teacher: previous` uses the previous student instead). Everything a
recipe needs is checked, and every stage's architecture planned and printed, before any work starts.
Each step leaves a complete directory behind, so re-running a recipe skips what is done and resumes training from
its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from distill.calibrate import STATS_FILE, collect_importance, load_importance, save_importance
from distill.common import barrier, is_rank0
from distill.components.lr_scheduler import OptimConfig
from distill.components.metrics import read_metrics
from distill.config import (
    RESUMABLE_FIELDS,
    TrainConfig,
    TrainSettings,
    data_format,
    read_yaml,
    same_settings,
    validation_problems,
)
from distill.corpus import prepare_sources
from distill.data import DataConfig, build_tokens, load_splits
from distill.media_data import MediaDataConfig
from distill.media_lm import MediaLM, describe_encoder, encoder_params_of, is_media_config, join, split
from distill.model_io import decoder_config, load_config, load_model, model_from_state, plain_state, save_model
from distill.plan import (
    Architecture,
    Axis,
    FfnScore,
    LayerScore,
    PlanError,
    TiedEmbeddings,
    hidden_rotation,
    plan_architecture,
    prune_to,
)
from distill.resources import ClusterConfig, describe_needs, stage_needs
from distill.train import Trainer
from models.checkpoint import is_prepared, weights_state
from models.registry import FAMILY_MEDIA, REGISTRY, ModelSpec, cascade_home, get_model, register_model

log = logging.getLogger(__name__)
FAMILIES = ("llama", "mistral", "ministral3", *FAMILY_MEDIA)  # what a registered student's model_type may be
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kKmMbBtT]?)\s*$")


class RecipeError(ValueError):
    pass


def parse_count(value: int | str) -> int:
    """`100M`, `1.5B`, `250k`, `1T` or a plain integer."""
    if isinstance(value, int):
        return value
    match = _SIZE.match(value)
    if not match:
        raise ValueError(f"not a count: {value!r} (use e.g. 100M, 1.5B, 250k)")
    scale = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[match.group(2).lower()]
    return int(float(match.group(1)) * scale)


class Target(BaseModel):
    model_config = ConfigDict(extra="forbid")
    params: int | None = Field(None, description="parameter count, e.g. 100M")
    dims: dict[str, int] = Field(default_factory=dict, description="explicit dims, e.g. num_hidden_layers: 24")
    axes: tuple[Axis, ...] = Field(("intermediate_size", "num_hidden_layers"),
                                   description="dims a params target may shrink")
    tied_embeddings: TiedEmbeddings = Field("untie", description="when the hidden size of a tied model is cut: "
                                            "untie the head (exact, more params) or approximate the final norm")

    @field_validator("params", mode="before")
    @classmethod
    def _count(cls, value: int | str | None) -> int | None:
        return None if value is None else parse_count(value)


class Stage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$", description="registry name of this stage's student")
    target: Target
    tokens: int
    teacher: Literal["parent", "previous"] = "parent"
    optim: OptimConfig | None = None
    drafter: bool = Field(False, description="register the student as the root parent's drafter for speculative "
                                             "decoding (`python -m serve --draft-model NAME`)")
    posttrain: str | None = Field(None, description="a post-training recipe (path relative to this recipe's "
                                  "folder; its model: this stage's name) run on the student once it is distilled, "
                                  "e.g. GRPO with the parent's logits in the loss; the next stage still starts from "
                                  "the distilled student")

    @field_validator("tokens", mode="before")
    @classmethod
    def _tokens(cls, value: int | str) -> int:
        return parse_count(value)


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")
    parent: str = Field(description="registry name or checkpoint directory of the root parent (the teacher)")
    after: str | None = Field(None, description="a post-training recipe (path relative to this recipe's folder) "
                              "whose result is the parent, run first (a no-op once done): e.g. the reasoning "
                              "variant made from the bundled model, then distilled down")
    data: Annotated[Annotated[DataConfig, Tag("text")] | Annotated[MediaDataConfig, Tag("media")],
                    Discriminator(data_format)]
    calibration_sequences: int = Field(32, ge=1)
    layer_score: LayerScore = "block_importance"
    ffn_score: FfnScore = "ffn_mean_abs"
    train: TrainSettings = TrainSettings()
    stages: list[Stage] = Field(min_length=1)
    seed: int = 0
    cluster: ClusterConfig | None = Field(None, description="the GPUs to plan for: `--dry-run` then prints each "
                                          "stage's memory per GPU under FSDP2, the fewest GPUs it fits on and its "
                                          "GPU-hours (distill/resources.py)")

    @model_validator(mode="after")
    def _answers_teacher(self) -> Recipe:
        """Teacher-written data comes from the root parent unless a source names another model."""
        if isinstance(self.data, DataConfig):
            self.data.default_answers_teacher(self.parent)
        return self


def load_recipe(path: Path) -> Recipe:
    raw = read_yaml(path, RecipeError)
    from pydantic import ValidationError

    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as e:
        raise RecipeError(f"{path}: {validation_problems(e, 'recipe')}") from e
    if recipe.after is not None:  # checked now, before the parent is made
        recipe.after = str((path.parent / recipe.after).resolve())
        made = parent_chain(recipe, path)[-1].name
        if made != recipe.parent:
            raise RecipeError(f"{path}: runs after {Path(recipe.after).name}, which makes {made!r}: the parent must "
                              f"be that model, not {recipe.parent!r}")
    for stage in recipe.stages:  # checked now, before any stage trains
        if stage.posttrain is not None:
            stage.posttrain = str((path.parent / stage.posttrain).resolve())
            first = _posttrain_chain(stage, path)[0]
            if first.model != stage.name:
                raise RecipeError(f"{path}: stage {stage.name}: its posttrain recipe {first.name} must start from "
                                  f"the stage's student (model: {stage.name}), not {first.model}")
    return recipe


def parent_chain(recipe: Recipe, path: Path | None = None) -> list:  # [PostTrainRecipe]: first to last
    """The post-training recipes that make the parent (`after`), first to last; [] when the parent exists."""
    return [] if recipe.after is None else _recipe_chain(recipe.after, f"{path or 'recipe'}: after")


def _posttrain_chain(stage: Stage, path: Path | None = None) -> list:  # [PostTrainRecipe]: first to last
    return _recipe_chain(str(stage.posttrain), f"{path or 'recipe'}: stage {stage.name}: posttrain")


def _recipe_chain(posttrain: str, where: str) -> list:
    from distill.posttrain import PostTrainError, load_recipe_chain

    try:
        return load_recipe_chain(Path(posttrain), None)
    except PostTrainError as e:
        raise RecipeError(f"{where}: {e}") from e


@dataclasses.dataclass
class StagePlan:
    stage: Stage
    source: Architecture
    target: Architecture
    encoder: str | None = None  # an audio/vision parent's encoder, copied into every stage unchanged


def describe_plan(recipe: Recipe, parent: str, plans: list[StagePlan], cluster: ClusterConfig | None = None
                  ) -> list[str]:
    """What `--dry-run` prints and a run logs first: the parent, then each stage's decoder; with `cluster`, each
    stage's GPU memory, fewest GPUs and GPU-hours, and a total."""
    lines = [f"cascade {recipe.name}: parent {parent}: {plans[0].source.describe()}"]
    if plans[0].encoder:
        lines.append(f"  {plans[0].encoder}; projector kept and retrained in every stage; only the decoder is pruned")
    needs = []
    for i, plan in enumerate(plans, 1):
        lines.append(f"  stage {i} {plan.stage.name}: {plan.target.describe()}, {plan.stage.tokens:,} tokens, "
                     f"teacher {plan.stage.teacher}"
                     + (f"; then post-trained by {Path(plan.stage.posttrain).name}" if plan.stage.posttrain else ""))
        if cluster is not None:
            teacher = None if recipe.train.teacher_top_k else (
                plans[0].source if plan.stage.teacher == "parent" else plan.source)
            needs.append(stage_needs(plan.target, teacher, plan.stage.tokens, recipe.data.seq_len,
                                     recipe.train.batch_size, recipe.train.activation_checkpointing,
                                     recipe.train.loss.chunk_tokens, cluster,
                                     teacher_bytes=getattr(torch, recipe.train.teacher_dtype).itemsize))
            lines += describe_needs(needs[-1], plan.stage.tokens, cluster)
    if needs:
        least = [n.min_gpus for n in needs]
        lines.append(f"  needs: {'no GPU count fits every stage' if None in least else f'at least {max(least)} GPUs'}"
                     f" ({cluster.gpu}); {sum(n.gpu_hours for n in needs):,.0f} GPU-hours in all "
                     f"({sum(n.gpu_hours for n in needs) / cluster.gpus / 24:,.1f} days on {cluster.gpus})")
    return lines


def plan_recipe(recipe: Recipe) -> tuple[ModelSpec, list[StagePlan]]:
    """Check everything checkable without running a model; returns the parent spec and each stage's architecture.
    A parent that its `after` recipes have not made yet is planned from the model they start from (post-training
    keeps the architecture) and that model's spec is returned."""
    try:
        parent = get_model(recipe.parent)
    except KeyError as e:
        if recipe.after is None:
            raise RecipeError(str(e)) from e
        parent = get_model(parent_chain(recipe)[0].model)
    names = [s.name for s in recipe.stages]
    for name in names:
        if names.count(name) > 1:
            raise RecipeError(f"stage name {name!r} is used twice")
        if name in REGISTRY:
            raise RecipeError(f"stage name {name!r} is a built-in model name")
    for source in recipe.data.sources:
        missing = [p for p in source.paths if not glob.glob(p, recursive=True)]
        if missing:
            raise RecipeError(f"data: no files match {', '.join(missing)}")
    from models.prepare import prepare

    parent_dir = parent.checkpoint_dir if parent.source == "config" else prepare(parent)
    config = load_config(parent_dir, weights=parent.source != "config")
    arch = Architecture.of(decoder_config(config))
    encoder = None
    if is_media_config(config):
        encoder = describe_encoder(config, encoder_params_of(config))
    if isinstance(recipe.data, MediaDataConfig) and encoder is None:
        raise RecipeError(f"data.format media needs an audio or vision parent; {parent.name} is a text model")
    plans = []
    for i, stage in enumerate(recipe.stages):
        if stage.target.params is None and not stage.target.dims:
            raise RecipeError(f"stage {stage.name}: target needs params or dims")
        try:
            target = plan_architecture(arch, stage.target.dims, stage.target.params, stage.target.axes,
                                       stage.target.tied_embeddings)
        except PlanError as e:
            raise RecipeError(f"stage {i + 1} ({stage.name}): {e}") from e
        plans.append(StagePlan(stage, arch, target, encoder))
        arch = target
    return parent, plans


def run_recipe(recipe: Recipe, runs: Path | None = None, progress: bool = True) -> list[dict]:
    from distill.posttrain import run_posttrain

    for made in parent_chain(recipe):  # the parent first, when a post-training recipe makes it
        run_posttrain(made)
    parent_spec, plans = plan_recipe(recipe)
    if parent_spec.source == "config":
        raise RecipeError(f"{parent_spec.name} is a config-only entry (no weights offline): `--dry-run` plans it; "
                          "running needs the checkpoint (register a local copy)")
    parent_dir = parent_spec.checkpoint_dir
    runs = runs or cascade_home() / "runs" / recipe.name
    if is_rank0():
        print("\n".join(describe_plan(recipe, parent_spec.name, plans)))
        prepare_sources(recipe.data, progress)  # the teacher's answers, once, before any stage needs them
    barrier()
    results = []
    source_dir = parent_dir
    for i, plan in enumerate(plans, 1):
        stage, stage_dir = plan.stage, runs / plan.stage.name
        teacher_dir = parent_dir if stage.teacher == "parent" else source_dir
        pruned_dir = stage_dir / "pruned"
        # Each step's directory is stamped with what it was made from: a changed recipe or a retrained source
        # rebuilds it (and drops training checkpoints that started from the old pruned model) instead of reusing it.
        importance_stamp = importance_marker(source_dir, recipe)
        pruned_stamp = pruned_marker(importance_stamp, plan.target, recipe)
        if is_rank0():
            importance = stage_dir / "importance"
            if not is_prepared(importance, importance_stamp):
                calibrate(source_dir, recipe, importance, progress, importance_stamp)
            if not is_prepared(pruned_dir, pruned_stamp):
                prune_checkpoint(source_dir, load_importance(importance / STATS_FILE), plan.target, recipe, pruned_dir,
                                 pruned_stamp)
                shutil.rmtree(stage_dir / "train", ignore_errors=True)
        barrier()
        train = train_config(recipe.train, student=pruned_dir, teacher=teacher_dir, eval_teacher=parent_dir,
                             out_dir=stage_dir / "train", data=recipe.data, tokens=stage.tokens, seed=recipe.seed + i,
                             optim=stage.optim or recipe.train.optim)
        student_dir = cascade_home() / "models" / stage.name
        done = _finished_card(student_dir, recipe, i, plan, pruned_stamp, train)
        if done is not None:
            if is_rank0():
                print(f"stage {i} {stage.name}: already done ({student_dir})")
            results.append(_posttrained(stage, done, stage_dir))
            source_dir = student_dir
            continue
        trainer = Trainer(train, progress=progress)
        final = trainer.train(resume=True)
        metrics = read_metrics(Path(train.out_dir) / "metrics.jsonl") if is_rank0() else []
        card = {
            "name": stage.name, "recipe": recipe.name, "stage": i, "parent": parent_spec.name,
            "initialised_from": str(source_dir), "teacher": str(teacher_dir),
            "architecture": plan.target.as_dict(), "params": plan.target.params,
            "tokens_seen": trainer.step * trainer.tokens_per_step, "planned_tokens": stage.tokens,
            "data": recipe.data.model_dump(),
            "loss": recipe.train.loss.model_dump(), "pruned_only": metrics[0] if metrics else {}, "final": final,
            **({"encoder": {"kept": plan.encoder, "weights": "copied from the parent, frozen"},
                "projector": "kept, rotated with the residual stream when the hidden size was cut, trained with "
                             "the decoder"} if plan.encoder else {}),
            "train_seconds": round(trainer.elapsed, 1), "start": pruned_stamp, "train_config": _settings(train),
        }
        trainer.export(student_dir, card)
        if is_rank0():
            (student_dir / "README.md").write_text(model_card(card))
            family = load_config(student_dir).model_type
            register_model(dataclasses.replace(
                parent_spec, name=stage.name, source="local", path=student_dir,
                family=family if family in FAMILIES else parent_spec.family,
                description=f"cascade {recipe.name} stage {i}: {plan.target.params / 1e6:.1f}M params distilled "
                            f"from {parent_spec.name}" + (" (a drafter)" if stage.drafter else ""),
                draft_for=parent_spec.name if stage.drafter else None,
            ))
            print(f"stage {i} {stage.name}: val ppl {card['pruned_only'].get('val_ppl', float('nan')):.1f} -> "
                  f"{final['val_ppl']:.1f}, KL to parent {card['pruned_only'].get('val_kl', float('nan')):.3f} -> "
                  f"{final.get('val_kl', float('nan')):.3f}; registered as {stage.name} ({student_dir})")
        barrier()
        results.append(_posttrained(stage, card, stage_dir))
        source_dir = student_dir
    return results


def _posttrained(stage: Stage, card: dict, stage_dir: Path) -> dict:
    """The stage's card, with its post-training run's card under "posttrain" when the stage has one (the run's files
    beside the stage's, its result registered under the post-training recipe's name)."""
    if stage.posttrain is None:
        return card
    from distill.posttrain import run_posttrain

    cards = [run_posttrain(recipe, stage_dir / "posttrain" / recipe.name) for recipe in _posttrain_chain(stage)]
    return card | {"posttrain": cards[-1]}


def train_config(settings: TrainSettings, **run: object) -> TrainConfig:
    """One run's config: a recipe's train settings plus the run's own fields (paths, data, budget, overrides)."""
    values = {k: str(v) if isinstance(v, Path) else v for k, v in run.items()}
    return TrainConfig.model_validate({**dict(settings), **values})


def _finished_card(student_dir: Path, recipe: Recipe, stage: int, plan: StagePlan, start: str,
                   train: TrainConfig) -> dict | None:
    """The model card of this stage from an earlier run with the same start and settings, if the student is complete."""
    path = student_dir / "cascade-card.json"
    if not is_prepared(student_dir, "distill") or not path.is_file():
        return None
    card = json.loads(path.read_text())
    expected = {"recipe": recipe.name, "stage": stage, "architecture": plan.target.as_dict(), "start": start}
    if not all(card.get(k) == v for k, v in expected.items()):
        return None
    non_default = train.model_dump(mode="json", exclude={"student", *RESUMABLE_FIELDS}, exclude_defaults=True)
    return card if same_settings(card.get("train_config"), _settings(train), non_default) else None


def _settings(train: TrainConfig) -> dict:
    """What decides a student besides its start: everything but where files go and how often they are written."""
    return train.model_dump(mode="json", exclude={"student", *RESUMABLE_FIELDS})


def fingerprint(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def importance_marker(source_dir: Path, recipe: Recipe) -> str:
    return "importance " + fingerprint(str(source_dir), weights_state(source_dir), recipe.data.model_dump(),
                                       recipe.calibration_sequences)


def pruned_marker(importance: str, target: Architecture, recipe: Recipe) -> str:
    return "pruned " + fingerprint(importance, target.as_dict(), recipe.layer_score, recipe.ffn_score)


def pruned_start(recipe: Recipe, work: Path) -> tuple[Path, Path]:
    """(parent checkpoint, the recipe's first stage pruned from it, before training) under `work`: the common start
    of the benchmarks that compare training settings or trainers."""
    parent, plans = plan_recipe(recipe)
    importance, stamp = work / "importance", importance_marker(parent.checkpoint_dir, recipe)
    if not is_prepared(importance, stamp):
        calibrate(parent.checkpoint_dir, recipe, importance, True, stamp)
    pruned, pruned_stamp = work / "pruned", pruned_marker(stamp, plans[0].target, recipe)
    if not is_prepared(pruned, pruned_stamp):
        prune_checkpoint(parent.checkpoint_dir, load_importance(importance / STATS_FILE), plans[0].target, recipe,
                         pruned, pruned_stamp)
    return parent.checkpoint_dir, pruned


def calibrate(model_dir: Path, recipe: Recipe, out: Path, progress: bool = True, marker: str = "importance") -> Path:
    """Importance statistics of `model_dir` over the first calibration sequences of the training split (with
    media data, the sequences with their media in context: the stream carries the projected features too)."""
    model = load_model(model_dir)
    if isinstance(recipe.data, MediaDataConfig):
        rows = load_splits(recipe.data, recipe.parent)[0]  # the root parent's encoder made the features
        n = min(recipe.calibration_sequences, len(rows))
        batches = [rows.batch(torch.tensor([r]), torch.device("cpu")) for r in range(n)]
        lengths = [int((b.ids[0] != 0).nonzero().max()) + 1 for b in batches]  # rows are padded with id 0
        stats = collect_importance(model, [b.ids[:, :length] for b, length in zip(batches, lengths, strict=True)],
                                   progress=progress, media=[b.media for b in batches])
        return save_importance(stats, out, {"model": str(model_dir), "sequences": str(n)}, marker)
    rows = build_tokens(recipe.data, model_dir)["train"][: recipe.calibration_sequences]
    batches = rows.view(-1, 1, rows.shape[1]) if len(rows) % 4 else rows.view(-1, 4, rows.shape[1])
    stats = collect_importance(model, batches, progress=progress)
    return save_importance(stats, out, {"model": str(model_dir), "sequences": str(len(rows))}, marker)


def prune_checkpoint(source_dir: Path, stats: dict[str, torch.Tensor], target: Architecture, recipe: Recipe,
                     out: Path, marker: str = "pruned") -> Path:
    model = load_model(source_dir)
    if isinstance(model, MediaLM):  # the decoder is pruned; encoder and projector are carried over (media_lm.join)
        full = model.full_model()
        lm_config, lm_state, rest = split(full)
        config, state = prune_to(lm_config, lm_state, stats, target, recipe.layer_score, recipe.ffn_score)
        rotation = hidden_rotation(stats, Architecture.of(lm_config), target)
        child = MediaLM(join(full.config, config, state, rest, rotation))
        log.info("pruned %s -> %s", source_dir, Architecture.of(child.config).describe())
        return save_model(child, out, source_dir, recipe=marker)
    config, state = prune_to(model.config, plain_state(model), stats, target, recipe.layer_score, recipe.ffn_score)
    child = model_from_state(config, state)
    log.info("pruned %s -> %s", source_dir, Architecture.of(child.config).describe())
    return save_model(child, out, source_dir, recipe=marker)


def model_card(card: dict) -> str:
    arch = Architecture(**card["architecture"])
    before, after = card["pruned_only"], card["final"]
    return "\n".join([
        f"# {card['name']}", "",
        f"Stage {card['stage']} of the cascade recipe `{card['recipe']}`: pruned from `{card['initialised_from']}` "
        f"and distilled from `{card['teacher']}` (root parent: {card['parent']}).", "",
        f"- Architecture: {arch.describe()}",
        f"- Tokens seen in distillation: {card['tokens_seen']:,}",
        f"- Loss: {card['loss']['divergence']} (temperature {card['loss']['temperature']}, "
        f"CE weight {card['loss']['ce_weight']})",
        f"- Training time: {card['train_seconds']} s", "",
        "| held-out | pruned only | after distillation |", "|---|---|---|",
        f"| perplexity | {before.get('val_ppl', float('nan')):.2f} | {after['val_ppl']:.2f} |",
        f"| KL(parent ‖ student) per token | {before.get('val_kl', float('nan')):.4f} | "
        f"{after.get('val_kl', float('nan')):.4f} |",
        f"| top-1 agreement with parent | {before.get('val_top1_agree', float('nan')):.3f} | "
        f"{after.get('val_top1_agree', float('nan')):.3f} |", "",
        f"Data: {json.dumps(card['data'])}", "",
    ])
