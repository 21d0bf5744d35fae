"""Training a student on one CPU or under torchrun + FSDP2: a thin loop over components (after torchtitan).

Components (distill/components/) own their config and state: the checkpointer (atomic, exact resume, refusal of
mismatched settings), the optimizer and its schedule, the evaluator, the metrics log. The objective
(distill/objectives/: today knowledge distillation) owns its teacher and loss. This file builds them from one
`TrainConfig` (distill/config.py) and runs the loop.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch

from distill.common import all_sum, autocast, barrier, device, is_rank0, shard, world
from distill.components.checkpointer import Checkpointer, CheckpointMismatchError, full_model_state
from distill.components.evaluator import Evaluator
from distill.components.lora import add_adapters, merged_copy, save_adapter, trainable_share
from distill.components.lr_scheduler import build_optimizer, lr_at, set_lr
from distill.components.metrics import MetricsLogger
from distill.components.models import Student, load_teacher, reinitialise, set_attention
from distill.config import TrainConfig, run_settings
from distill.data import BatchSampler, load_splits
from distill.model_io import load_model, save_model
from distill.objectives import OBJECTIVES
from models.checkpoint import weights_state

log = logging.getLogger(__name__)


class TrainingDivergedError(RuntimeError):
    pass


class Trainer:
    def __init__(self, config: TrainConfig, progress: bool = True) -> None:
        self.config, self.progress = config, progress
        self.rank, self.world = world()
        self.out = Path(config.out_dir)
        self.device = device()
        torch.manual_seed(config.seed)

        # data: rank 0 writes the token cache, the others read it
        if config.data.format == "text" and config.data.val_sequences % self.world:
            raise ValueError(f"data.val_sequences ({config.data.val_sequences}) must be a multiple of the number of "
                             f"processes ({self.world}): every rank runs the same evaluation batches")
        if is_rank0():
            load_splits(config.data, config.data_model())
        barrier()
        self.train_data, val_data = load_splits(config.data, config.data_model())
        val_data = val_data.padded(self.world)  # chat data: empty rows so every rank evaluates as many
        self.train_rows = self.train_data.ids
        self.sampler = BatchSampler(self.train_rows, config.batch_size, config.grad_accum, self.world, config.seed)
        self.tokens_per_step = self.sampler.sequences_per_step * self.train_rows[0].numel()  # a pair: 2 x seq_len
        self.total_steps = math.ceil(config.tokens / self.tokens_per_step)

        # models and objective
        self.student_weights = weights_state(Path(config.student))  # a resumed run must start from the same weights
        lm = set_attention(load_model(Path(config.student)).to(self.device), config.attention, self.device)
        if config.random_init:
            reinitialise(lm, config.seed)
        if config.train_only == "projector":
            if not hasattr(lm.model, "projector"):
                raise ValueError("train_only: projector needs an audio or vision model (it has a projector)")
            for name, p in lm.named_parameters():
                p.requires_grad_(name.startswith("model.projector."))
        if config.activation_checkpointing:  # before sharding, as torchtitan applies it; same values, less memory
            decoder = getattr(lm.model, "language_model", lm)  # an audio/vision model: its decoder's layers
            decoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.adapter = add_adapters(lm, config.lora) if config.lora is not None else None  # lm changed in place
        if self.adapter is not None:
            log.info("LoRA rank %d: %d of %d parameters train", config.lora.rank, *trainable_share(lm))  # type: ignore[union-attr]
        self.student = Student(lm)
        self.objective = OBJECTIVES[config.objective](config, self.student, self.train_rows, self.sampler,
                                                      self.total_steps, self.device, progress)
        log.info("objective: %s; attention: %s", self.objective.describe(), config.attention)
        # a served teacher is not loaded here for evaluation either (val_kl then needs an explicit eval_teacher)
        eval_teacher = config.eval_teacher or (config.teacher if config.teacher_server is None else None)
        reuse = eval_teacher == config.teacher and self.objective.teacher is not None
        teacher = (self.objective.teacher if reuse else load_teacher(
            Path(eval_teacher), Path(config.student), lm.config.vocab_size, config.attention, self.device,
            config.teacher_dtype)
            if eval_teacher else None)
        self.evaluator = Evaluator(config.eval, val_data, config.batch_size, teacher, config.precision, self.device,
                                   getattr(self.objective, "validation", None))
        if self.world > 1:
            log.info("FSDP2 over %d ranks; the student's units: %s", self.world, ", ".join(shard(self.student, lm)))

        # optimizer, checkpoints, log
        self.optimizer = build_optimizer(self.student, config.optim)
        self.checkpointer = Checkpointer(self.out / "checkpoints", config.checkpoint,
                                         tied_head=bool(getattr(lm.config, "tie_word_embeddings", False)))
        self.metrics = MetricsLogger(self.out, self.total_steps, self.tokens_per_step, progress)
        self.step = 0

    @property
    def elapsed(self) -> float:
        """Training wall time in seconds, summed over resumed runs."""
        return self.metrics.elapsed

    def evaluate(self) -> dict[str, float]:
        return self.evaluator(self.student)

    def train(self, resume: bool = False) -> dict[str, float]:
        self.out.mkdir(parents=True, exist_ok=True)
        last_good = self.checkpointer.latest()
        elapsed = self._resume(last_good) if resume and last_good is not None else 0.0
        self.metrics.start(self.step, elapsed)
        if self.step == 0:
            self.metrics.log({"step": 0, "tokens": 0, **self.evaluate()})
            self.metrics.start_clock(self.step)
        self.student.train()
        final: dict[str, float] | None = None
        try:
            while self.step < self.total_steps:
                lr = lr_at(self.step, self.total_steps, self.config.optim)
                set_lr(self.optimizer, lr)
                means = self._forward_backward()
                grad_norm = self._clip_and_check(means["loss"], last_good)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                record = {"step": self.step, "tokens": self.step * self.tokens_per_step, **means, "lr": lr,
                          "grad_norm": grad_norm, "tokens_per_s": self.metrics.step_done(self.step)}
                record["elapsed_s"] = round(self.elapsed, 2)  # training wall time so far (step times: differences)
                if self.evaluator.due(self.step, self.total_steps):
                    final = self.evaluate()
                    record |= final
                self.metrics.log(record)
                if self.checkpointer.due(self.step, self.total_steps):
                    last_good = self._save()
        finally:
            self.objective.close()  # e.g. its rollout engine
        self.metrics.close(f"{self.config.objective} {self.out.name}")
        return final if final is not None else self.evaluate()  # a finished run resumed: evaluate what is there

    def _forward_backward(self) -> dict[str, float]:
        """One optimizer step's micro-batches; returns the objective's metrics as per-token means over all ranks.

        Each micro-batch's loss goes backward as a sum over its trained tokens; the gradients are then divided by
        the trained tokens of the whole step on every rank. Dividing each micro-batch by its own count (or each
        sequence by its length) would weigh a token by how full its micro-batch was (trl#3021, notes §3)."""
        sums: dict[str, torch.Tensor] = {}
        for micro in range(self.config.grad_accum):
            batch = self.train_data.batch(self.sampler.indices(self.step, micro, self.rank), self.device)
            with autocast(self.config.precision, self.device):
                loss, metrics = self.objective(self.student, batch, self.step)
            n = metrics["tokens"].double()
            (loss * metrics["tokens"]).backward()  # the sum over this micro-batch's trained tokens
            for name, value in {"loss": loss.detach(), **metrics}.items():
                if name != "tokens":  # "batch_" metrics describe the micro-batch: a plain mean over micro-batches
                    sums[name] = sums.get(name, 0) + value.double() * (1.0 if name.startswith("batch_") else n)
            sums["tokens"] = sums.get("tokens", 0) + n
        sums["micro_batches"] = torch.full((), float(self.config.grad_accum), dtype=torch.float64,
                                           device=sums["tokens"].device)
        names = list(sums)
        totals = all_sum(torch.stack([sums[k].reshape(()) for k in names]))
        count = totals[names.index("tokens")]
        batches = totals[names.index("micro_batches")]
        # FSDP2 averages gradients over ranks: x world turns that mean back into the sum over every rank
        scale = self.world / max(count.item(), 1.0)
        for p in self.student.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
        return {k: (totals[i] / (batches if k.startswith("batch_") else count.clamp_min(1))).item()
                for i, k in enumerate(names) if k not in ("tokens", "micro_batches")}

    def _clip_and_check(self, loss: float, last_good: Path | None) -> float:
        grad_norm = torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.config.optim.grad_clip)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {grad_norm}"
            raise TrainingDivergedError(
                f"{what} at step {self.step}; stopped before the update. The last good checkpoint is "
                f"{last_good or 'none (no checkpoint written yet)'}; lower optim.lr or check the data, then "
                "resume with --resume")
        return grad_norm

    def _save(self) -> Path:
        return self.checkpointer.save(self.step, self.student, self.optimizer, {
            "total_steps": self.total_steps, "tokens_seen": self.step * self.tokens_per_step,
            "elapsed_s": self.metrics.elapsed, "data_position": self.step * self.sampler.sequences_per_step,
            "world_size": self.world, "config": self.config.model_dump(mode="json"),
            "student_weights": self.student_weights})

    def _resume(self, path: Path) -> float:
        """Load `path`; returns the training time it had recorded."""
        expected = {**run_settings(self.config), "student_weights": self.student_weights}
        given = {**run_settings(self.config, defaults=False), "student_weights": self.student_weights}
        written = self.checkpointer.state(path)
        if written.get("world_size", self.world) != self.world:
            # Another world size: the step's rows are the same when the global batch is (world x batch x
            # accumulation), so that, not the accumulation, must match (e.g. 2 nodes x accum 1 -> 1 node x accum 2).
            c = written["config"]
            written_global = written["world_size"] * c["batch_size"] * c["grad_accum"]
            if written_global != self.sampler.sequences_per_step:
                raise CheckpointMismatchError(
                    f"{path} was written by {written['world_size']} process(es) with {written_global} sequences a "
                    f"step; this run has {self.world} x batch_size {self.config.batch_size} x grad_accum "
                    f"{self.config.grad_accum} = {self.sampler.sequences_per_step}: set grad_accum so they match, "
                    f"or delete {self.checkpointer.root} to start this run again")
            for settings in (expected, given):
                settings.pop("grad_accum", None)
            log.info("resuming a %d-process checkpoint with %d process(es)", written["world_size"], self.world)
        state = self.checkpointer.load(path, self.student, self.optimizer, expected,
                                       f"delete {self.checkpointer.root} to start this run again",
                                       {"student_weights": f"the weights in {self.config.student}"}, given)
        self.step = int(state["step"])
        log.info("resumed from %s (step %d of %d)", path, self.step, self.total_steps)
        return float(state.get("elapsed_s", 0.0))

    def export(self, out: Path, card: dict | None = None) -> Path:
        """Write the trained student as a plain HF checkpoint (config + safetensors + the parent's tokenizer)."""
        weights = full_model_state(self.student)
        if is_rank0():
            lm, adapter = self.student.lm, self.adapter
            if self.world > 1:  # the ranks hold shards: a plain copy on rank 0 takes the gathered weights
                lm = load_model(Path(self.config.student))
                adapter = add_adapters(lm, self.config.lora) if self.config.lora is not None else None
            lm.load_state_dict({k.removeprefix("lm."): v for k, v in weights.items()})
            extra = {"cascade-card.json": json.dumps(card, indent=1) + "\n"} if card else None
            if adapter is None:
                save_model(lm, out, Path(self.config.student), extra_files=extra)
            else:  # the merged model as a plain checkpoint, the adapter beside it in adapter/
                save_model(merged_copy(adapter), out, Path(self.config.student), extra_files=extra,
                           also=lambda tmp: save_adapter(adapter, tmp / "adapter"))
        barrier()
        return out
