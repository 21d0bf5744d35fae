"""Continued training of a student with distillation from a frozen teacher, on one CPU or under torchrun + FSDP2.

One loop for every case: the student (and the teacher, frozen: eval mode, no grad, no optimizer state) are
`fully_shard`ed per decoder layer when a process group exists; checkpoints are full state dicts written by rank 0 as
safetensors + JSON (never pickle) into a directory renamed into place, so a run killed at any point resumes from
its last complete checkpoint and reads the same batches it would have read (see data.BatchSampler).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from distill.data import BatchSampler, DataConfig, build_tokens
from distill.losses import LossConfig, distill_loss, shared_vocab, token_divergence
from distill.model_io import check_same_tokenizer, load_model, save_model
from models.checkpoint import COMPLETE_MARKER, atomic_directory, weights_state

log = logging.getLogger(__name__)


FUSED_MIN_VOCAB = 65536  # Mistral's 131k Tekken vocabulary: where [tokens x vocab] logits dominate memory


class OptimConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lr: float = Field(3e-4, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_fraction: float = Field(0.05, ge=0, lt=1)
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = Field(1.0, gt=0)


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    student: str = Field(description="checkpoint directory (or registry name) the student starts from")
    teacher: str | None = Field(None, description="teacher checkpoint; None trains with cross-entropy only")
    eval_teacher: str | None = Field(None, description="teacher for KL-to-teacher in evaluation (default: teacher)")
    out_dir: str
    data: DataConfig
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    tokens: int = Field(gt=0, description="token budget; steps = tokens / tokens per step, rounded up")
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    eval_every: int = Field(20, ge=1)
    checkpoint_every: int = Field(20, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    precision: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="bfloat16 autocast for the transformer blocks (logits and losses stay fp32); auto: "
                            "bfloat16 where the device has native support (CUDA bf16, CPU AVX512-BF16/AMX)")
    random_init: bool = Field(False, description="re-initialise the student's weights (the from-scratch baseline)")
    teacher_top_k: int | None = Field(None, ge=1, description="distill from a cache of the teacher's top-k log-probs "
                                      "+ a tail bucket (computed once, reused across runs) instead of running it")
    fused_loss: Literal["auto", "on", "off"] = Field(
        "auto", description="the fused linear distillation loss (kernels/distill_loss.py: gradients made chunk by "
                            "chunk in the forward, no recomputed logits; Triton on GPU, torch rows on CPU); auto: on "
                            f"for vocabularies of >= {FUSED_MIN_VOCAB} entries with a live teacher")
    attention: Literal["sdpa", "cascade"] = Field(
        "sdpa", description="cascade: our Triton attention (kernels/attention.py) for student and teacher; needs a "
                            "CUDA GPU, or TRITON_INTERPRET=1 on CPU (correct but very slow)")
    seed: int = 0


class TrainingDivergedError(RuntimeError):
    pass


class CheckpointMismatchError(ValueError):
    """A checkpoint written under other settings: resuming it would silently mix two runs."""


# Settings a resumed run may change: where it writes, how often, and implementations of the same function (loss,
# attention); everything else must match its checkpoint.
RESUMABLE_FIELDS = ("out_dir", "eval_every", "checkpoint_every", "keep_checkpoints", "fused_loss", "attention")


class StudentLoss(nn.Module):
    """The student and its loss in one forward, so FSDP gathers the LM head for the chunked loss like any layer."""

    def __init__(self, lm: nn.Module, loss: LossConfig, fused: bool = False) -> None:
        super().__init__()
        self.lm, self.loss, self.fused = lm, loss, fused

    def forward(self, ids: torch.Tensor, teacher_hidden: torch.Tensor | None = None,
                teacher_head: torch.Tensor | None = None, logits_only: bool = False,
                teacher_topk: tuple[torch.Tensor, ...] | None = None):
        """(loss, metrics) for training; with `logits_only`, fp32 logits [B, T-1, V] for evaluation."""
        hidden = self.lm.model(input_ids=ids).last_hidden_state[:, :-1]
        if logits_only:
            with torch.autocast(ids.device.type, enabled=False):
                return hidden.float() @ self.lm.lm_head.weight.float().T
        labels = ids[:, 1:].reshape(-1)
        th = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]) if teacher_hidden is not None else None
        return distill_loss(hidden.reshape(-1, hidden.shape[-1]), self.lm.lm_head.weight, labels, self.loss,
                            th, teacher_head, teacher_topk, fused=self.fused)  # type: ignore[arg-type]


class TeacherHidden(nn.Module):
    """A frozen teacher that returns final hidden states and its head; logits are made chunk by chunk later."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lm.model(input_ids=ids).last_hidden_state[:, :-1], self.lm.lm_head.weight.detach()


def lr_at(step: int, total: int, optim: OptimConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio * lr; a pure function of the step (nothing to save)."""
    warmup = int(total * optim.warmup_fraction)
    if step < warmup:
        return optim.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    floor = optim.lr * optim.min_lr_ratio
    return floor + (optim.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "float32"


def _world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _all_sum(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
    return value


def _shard(module: nn.Module, lm: nn.Module) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = init_device_mesh(device, (dist.get_world_size(),))
    for layer in lm.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(module, mesh=mesh, reshard_after_forward=False)


def _reinit(model: nn.Module, seed: int) -> None:
    torch.manual_seed(seed)
    for module in model.modules():
        if hasattr(module, "reset_parameters") and module is not model:
            module.reset_parameters()
    model.apply(model._init_weights)


class Trainer:
    def __init__(self, config: TrainConfig, progress: bool = True) -> None:
        self.config, self.progress = config, progress
        self.rank, self.world = _world()
        self.out = Path(config.out_dir)
        cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        torch.manual_seed(config.seed)
        if config.data.val_sequences % self.world:
            raise ValueError(f"data.val_sequences ({config.data.val_sequences}) must be a multiple of the number of "
                             f"processes ({self.world}): every rank runs the same evaluation batches")
        if self.rank == 0:  # one process writes the token cache; the others read it
            build_tokens(config.data, config.teacher or config.student)
        if dist.is_initialized():
            dist.barrier()
        tokens = build_tokens(config.data, config.teacher or config.student)
        self.train_rows, self.val_rows = tokens["train"], tokens["val"]
        self.sampler = BatchSampler(self.train_rows, config.batch_size, config.grad_accum, self.world, config.seed)
        self.tokens_per_step = self.sampler.sequences_per_step * config.data.seq_len
        self.total_steps = math.ceil(config.tokens / self.tokens_per_step)

        self.student_weights = weights_state(Path(config.student))  # a resumed run must start from the same weights
        student = self._set_attention(load_model(Path(config.student)).to(self.device))
        if config.random_init:
            _reinit(student, config.seed)
        self.student_config = student.config
        distilling = config.teacher is not None and config.loss.kd_weight > 0
        long_vocab = student.config.vocab_size >= FUSED_MIN_VOCAB
        fused = config.fused_loss == "on" or (config.fused_loss == "auto" and long_vocab)
        self.student = StudentLoss(student, config.loss, fused=fused and not (distilling and config.teacher_top_k))
        log.info("loss: %s; attention: %s", "fused linear" if self.student.fused else "chunked (checkpointed)",
                 config.attention)
        self.cache = self._cache() if distilling and config.teacher_top_k else None
        self.teacher = self._teacher(config.teacher) if distilling and self.cache is None else None
        eval_teacher = config.eval_teacher or config.teacher
        self.eval_teacher = (self.teacher if eval_teacher == config.teacher and self.teacher is not None
                             else self._teacher(eval_teacher) if eval_teacher else None)
        if self.world > 1:
            _shard(self.student, self.student.lm)
        decay = [p for n, p in self.student.named_parameters() if p.ndim >= 2 and "embed" not in n]
        no_decay = [p for n, p in self.student.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=config.optim.lr, betas=config.optim.betas, foreach=True,
        )
        self.step = 0
        self.elapsed = 0.0  # training wall time, summed over resumed runs

    def _cache(self):
        """Build (rank 0) or reuse the teacher's top-k for exactly the rows this run will read."""
        from distill.data import cache_key
        from distill.teacher_cache import TeacherCache, cache_dir, ensure_cache

        config, teacher = self.config, Path(self.config.teacher)  # type: ignore[arg-type]
        check_same_tokenizer(Path(config.student), teacher, self.student_config.vocab_size)
        needed = sorted({int(i) for step in range(self.total_steps) for micro in range(config.grad_accum)
                         for rank in range(self.world) for i in self.sampler.indices(step, micro, rank)})
        vocab = self.student_config.vocab_size
        data_key = cache_key(config.data, teacher)
        if self.rank == 0:
            autocast = torch.bfloat16 if resolve_precision(config.precision, self.device) == "bfloat16" else None
            ensure_cache(teacher, self.train_rows, needed, config.teacher_top_k, config.loss.temperature, vocab,
                         data_key, autocast, config.batch_size, self.progress)
        if dist.is_initialized():
            dist.barrier()
        return TeacherCache(cache_dir(teacher, data_key, config.teacher_top_k, config.loss.temperature, vocab))

    def _set_attention(self, model: nn.Module) -> nn.Module:
        if self.config.attention == "cascade":
            from kernels.hf import register
            from kernels.runtime import INTERPRET

            if self.device.type != "cuda" and not INTERPRET:
                raise ValueError("attention: cascade needs a CUDA GPU (or TRITON_INTERPRET=1 on CPU); use sdpa here")
            model.set_attn_implementation(register())
        return model

    def _teacher(self, path: str) -> TeacherHidden:
        teacher = TeacherHidden(self._set_attention(load_model(Path(path)).to(self.device)))
        vocab = shared_vocab(self.student.lm.config.vocab_size, teacher.lm.config.vocab_size)
        check_same_tokenizer(Path(self.config.student), Path(path), vocab)
        if self.world > 1:
            _shard(teacher, teacher.lm)
        return teacher

    def _autocast(self):
        if resolve_precision(self.config.precision, self.device) == "bfloat16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    # ---- checkpoints -------------------------------------------------------------------------------------------

    @property
    def checkpoint_root(self) -> Path:
        return self.out / "checkpoints"

    def latest_checkpoint(self) -> Path | None:
        done = sorted(p for p in self.checkpoint_root.glob("step-*") if (p / COMPLETE_MARKER).is_file())
        return done[-1] if done else None

    def _full_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model = get_model_state_dict(self.student, options=options)
        optim = get_optimizer_state_dict(self.student, self.optimizer, options=options)
        return model, optim

    def save_checkpoint(self) -> Path:
        model, optim = self._full_state()
        path = self.checkpoint_root / f"step-{self.step:06d}"
        if self.rank == 0:
            with atomic_directory(path, f"step {self.step}") as tmp:
                save_file(_untied(model, self.student_config), tmp / "model.safetensors")
                tensors, meta = _flatten_optimizer(optim)
                save_file(tensors, tmp / "optimizer.safetensors")
                save_file({"cpu": torch.get_rng_state()}, tmp / "rng.safetensors")
                (tmp / "state.json").write_text(json.dumps({
                    "step": self.step, "total_steps": self.total_steps, "tokens_seen": self.step * self.tokens_per_step,
                    "elapsed_s": self.elapsed,
                    "data_position": self.step * self.sampler.sequences_per_step, "optimizer": meta,
                    "world_size": self.world, "config": self.config.model_dump(mode="json"),
                    "student_weights": self.student_weights,
                }, indent=1) + "\n")
            for old in sorted(p for p in self.checkpoint_root.glob("step-*") if p != path)[:-(
                    self.config.keep_checkpoints - 1) or None]:
                shutil.rmtree(old, ignore_errors=True)
        if dist.is_initialized():
            dist.barrier()
        return path

    def load_checkpoint(self, path: Path) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        state = json.loads((path / "state.json").read_text())
        now = self.config.model_dump(mode="json")
        differ = [k for k, v in now.items() if k not in RESUMABLE_FIELDS and state["config"].get(k) != v]
        if state.get("student_weights", self.student_weights) != self.student_weights:
            differ.append(f"the weights in {self.config.student}")
        if differ:
            raise CheckpointMismatchError(
                f"{path} was written with other settings ({', '.join(differ)} differ); resume with the settings it "
                f"was written with, or delete {self.checkpoint_root} to start this run again")
        model = load_file(path / "model.safetensors")
        if getattr(self.student_config, "tie_word_embeddings", False):
            model["lm.lm_head.weight"] = model["lm.model.embed_tokens.weight"]
        optim = _unflatten_optimizer(load_file(path / "optimizer.safetensors"), state["optimizer"])
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=self.world > 1)
        set_model_state_dict(self.student, model, options=options)
        set_optimizer_state_dict(self.student, self.optimizer, optim, options=options)
        torch.set_rng_state(load_file(path / "rng.safetensors")["cpu"])
        self.step = int(state["step"])
        self.elapsed = float(state.get("elapsed_s", 0.0))
        if self.rank == 0:
            _truncate_metrics(self.out / "metrics.jsonl", self.step)
        log.info("resumed from %s (step %d of %d)", path, self.step, self.total_steps)

    # ---- training ----------------------------------------------------------------------------------------------

    def _log(self, record: dict) -> None:
        if self.rank == 0:
            with (self.out / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation cross-entropy / perplexity, KL(teacher || student) and top-1 agreement per token."""
        self.student.eval()
        sums = torch.zeros(4, dtype=torch.float64)  # ce, kl, agree, tokens
        rows = self.val_rows[self.rank::self.world]  # equal shares: FSDP ranks must run the same forwards
        for start in range(0, len(rows), self.config.batch_size):
            ids = rows[start:start + self.config.batch_size].to(self.device)
            labels = ids[:, 1:]
            with self._autocast():
                logits = self.student(ids, logits_only=True)
            with torch.autocast(self.device.type, enabled=False):
                sums[0] += torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
                if self.eval_teacher is not None:
                    with self._autocast():
                        t_hidden, t_head = self.eval_teacher(ids)
                    t_logits = t_hidden.float() @ t_head.float().T
                    sums[1] += token_divergence(logits, t_logits, "forward_kl").sum()
                    sums[2] += (logits.argmax(-1) == t_logits[..., : logits.shape[-1]].argmax(-1)).sum()
            sums[3] += labels.numel()
        sums = _all_sum(sums)
        self.student.train()
        n = sums[3].item()
        result = {"val_ce": sums[0].item() / n, "val_ppl": math.exp(min(50.0, sums[0].item() / n))}
        if self.eval_teacher is not None:
            result |= {"val_kl": sums[1].item() / n, "val_top1_agree": sums[2].item() / n}
        return result

    def train(self, resume: bool = False) -> dict[str, float]:
        self.out.mkdir(parents=True, exist_ok=True)
        latest = self.latest_checkpoint()
        if resume and latest is not None:
            self.load_checkpoint(latest)
        elif self.rank == 0:
            (self.out / "metrics.jsonl").unlink(missing_ok=True)
        if self.rank == 0 and self.step == 0:
            self._log({"step": 0, "tokens": 0, **self.evaluate()})
        elif self.step == 0:
            self.evaluate()
        self.student.train()
        bar = tqdm(total=self.total_steps, initial=self.step, desc="distill", unit="step",
                   disable=not self.progress or self.rank != 0)
        started, start_step, elapsed_before = time.perf_counter(), self.step, self.elapsed
        last_good = latest
        final: dict[str, float] | None = None
        while self.step < self.total_steps:
            lr = lr_at(self.step, self.total_steps, self.config.optim)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            totals = torch.zeros(4, dtype=torch.float64)  # loss, kd, ce, tokens
            for micro in range(self.config.grad_accum):
                rows = self.sampler.indices(self.step, micro, self.rank)
                ids = self.train_rows[rows].to(self.device)
                with self._autocast():
                    teacher = self.teacher(ids) if self.teacher is not None else (None, None)
                    topk = tuple(t.to(self.device) for t in self.cache.lookup(rows)) if self.cache else None
                    loss, metrics = self.student(ids, *teacher, teacher_topk=topk)
                (loss / self.config.grad_accum).backward()
                n = metrics["tokens"].double()
                totals += torch.stack([loss.detach().double() * n, metrics["kd"].double() * n,
                                       metrics["ce"].double() * n, n])
            totals = _all_sum(totals)
            mean_loss = (totals[0] / totals[3]).item()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.config.optim.grad_clip)
            grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
            if not (math.isfinite(mean_loss) and math.isfinite(grad_norm)):
                self.optimizer.zero_grad(set_to_none=True)
                what = f"loss is {mean_loss}" if not math.isfinite(mean_loss) else f"gradient norm is {grad_norm}"
                raise TrainingDivergedError(
                    f"{what} at step {self.step}; stopped before the update. The last good checkpoint is "
                    f"{last_good or 'none (no checkpoint written yet)'}; lower optim.lr or check the data, then "
                    "resume with --resume"
                )
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            elapsed = time.perf_counter() - started
            self.elapsed = elapsed_before + elapsed
            tok_s = (self.step - start_step) * self.tokens_per_step / max(elapsed, 1e-9)
            record = {"step": self.step, "tokens": self.step * self.tokens_per_step, "loss": mean_loss,
                      "kd": (totals[1] / totals[3]).item(), "ce": (totals[2] / totals[3]).item(), "lr": lr,
                      "grad_norm": grad_norm, "tokens_per_s": tok_s}
            if self.step % self.config.eval_every == 0 or self.step == self.total_steps:
                final = self.evaluate()
                record |= final
            self._log(record)
            bar.set_postfix(loss=f"{mean_loss:.3f}", tok_s=f"{tok_s:.0f}")
            bar.update()
            if self.step % self.config.checkpoint_every == 0 or self.step == self.total_steps:
                last_good = self.save_checkpoint()
        bar.close()
        if final is None:  # nothing left to train (a finished run resumed): evaluate what is there
            final = self.evaluate()
        if self.rank == 0:
            from distill.plots import plot_training

            plot_training(read_metrics(self.out / "metrics.jsonl"), self.out / "loss.png", f"distill {self.out.name}")
        return final

    def export(self, out: Path, card: dict | None = None) -> Path:
        """Write the trained student as a plain HF checkpoint (config + safetensors + the parent's tokenizer)."""
        model, _ = self._full_state()
        if self.rank == 0:
            lm = self.student.lm
            if self.world > 1:
                lm = load_model(Path(self.config.student))
            lm.load_state_dict({k.removeprefix("lm."): v for k, v in model.items()})
            extra = {"cascade-card.json": json.dumps(card, indent=1) + "\n"} if card else None
            save_model(lm, out, Path(self.config.student), extra_files=extra)
        if dist.is_initialized():
            dist.barrier()
        return out


def _untied(model: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory; the tied head is rebuilt from the embedding on load."""
    out = {k: v.contiguous() for k, v in model.items()}
    if getattr(config, "tie_word_embeddings", False):
        out.pop("lm.lm_head.weight", None)
    return out


def _flatten_optimizer(optim: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    for fqn, state in optim["state"].items():
        for key, value in state.items():
            tensors[f"{fqn}::{key}"] = torch.as_tensor(value).contiguous()
    groups = [{k: v for k, v in g.items()} for g in optim["param_groups"]]
    return tensors, {"param_groups": groups}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        fqn, key = name.split("::")
        state.setdefault(fqn, {})[key] = value
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def _truncate_metrics(path: Path, step: int) -> None:
    """A resumed run rewrites the log up to its checkpoint, so records after it are not duplicated."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
