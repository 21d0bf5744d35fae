"""Knowledge distillation: the divergence to a frozen teacher on every token (forward KL by default) plus an
optional cross-entropy term; cross-entropy only when the run has no teacher. The teacher runs live, or once ahead
of training as a cache of its top-k log-probs (distill/teacher_cache.py)."""

from __future__ import annotations

from pathlib import Path

import torch

from distill.common import barrier, is_rank0, resolve_precision
from distill.components.models import Student, Teacher, load_teacher
from distill.config import FUSED_MIN_VOCAB, TrainConfig
from distill.data import Batch, BatchSampler, cache_key
from distill.losses import LossConfig, distill_loss
from distill.model_io import check_same_tokenizer
from distill.served_teacher import ServedTeacher, served_identity
from distill.teacher_cache import TeacherCache, TopK, cache_dir, checkpoint_identity, ensure_cache, local_topk


class Distillation:
    def __init__(self, config: TrainConfig, student: Student, train_rows: torch.Tensor, sampler: BatchSampler,
                 total_steps: int, on: torch.device, progress: bool = True) -> None:
        self.config, self.device = config, on
        self.loss = self.loss_config(config)
        distilling = config.teacher is not None and self.loss.kd_weight > 0
        vocab = student.lm.config.vocab_size
        fused = config.fused_loss == "on" or (config.fused_loss == "auto" and vocab >= FUSED_MIN_VOCAB)
        self.fused = fused and not (distilling and config.teacher_top_k)  # the fused loss needs a live teacher
        if self.loss.head_matmul != "float32" and not self.fused:
            raise ValueError(f"loss.head_matmul: {self.loss.head_matmul} needs the fused loss (fused_loss: on and "
                             "a live teacher, no teacher_top_k); the chunked loss computes its head in float32")
        self.cache: TeacherCache | None = None
        self.teacher: Teacher | None = None
        if distilling and config.teacher_top_k:
            self.cache = _teacher_cache(config, vocab, train_rows, sampler.rows_read(total_steps), on, progress)
        elif distilling:
            self.teacher = load_teacher(Path(config.teacher), Path(config.student), vocab, config.attention, on,
                                        config.teacher_dtype)

    @staticmethod
    def loss_config(config: TrainConfig) -> LossConfig:
        """The loss this objective computes (KD: the run's `loss` section as given)."""
        return config.loss

    def describe(self) -> str:
        served = f" served at {self.config.teacher_server.url}" if self.config.teacher_server else ""
        source = f"cached top-k teacher{served}" if self.cache else "live teacher" if self.teacher else "no teacher"
        return f"kd ({source}; {'fused linear' if self.fused else 'chunked (checkpointed)'} loss)"

    def __call__(self, student: Student, batch: Batch, step: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        teacher_hidden, teacher_head = (self.teacher(batch.ids, batch.positions, batch.media)
                                        if self.teacher is not None else (None, None))
        topk = tuple(t.to(self.device) for t in self.cache.lookup(batch.rows)) if self.cache is not None else None
        return student(batch.ids, self._head_loss, positions=batch.positions, media=batch.media,
                       teacher_hidden=teacher_hidden,
                       teacher_head=teacher_head, teacher_topk=topk, labels=batch.labels)

    def close(self) -> None:
        """Nothing to stop: the teacher lives in this process."""

    def _head_loss(self, hidden: torch.Tensor, head: torch.Tensor, ids: torch.Tensor,
                   teacher_hidden: torch.Tensor | None, teacher_head: torch.Tensor | None,
                   teacher_topk: tuple[torch.Tensor, ...] | None, labels: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if labels is None:
            labels = ids[:, 1:].reshape(-1)  # [B*(T-1)]: position t predicts token t+1
        flat_teacher = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]) if teacher_hidden is not None else None
        return distill_loss(hidden.reshape(-1, hidden.shape[-1]), head, labels, self.loss, flat_teacher,
                            teacher_head, teacher_topk, fused=self.fused)  # type: ignore[arg-type]


def _teacher_cache(config: TrainConfig, vocab: int, train_rows: torch.Tensor, needed: list[int], on: torch.device,
                   progress: bool) -> TeacherCache:
    """Build (rank 0) or reuse the teacher's top-k for exactly the rows this run will read: from the checkpoint run
    here, or from `teacher_server` (the checkpoint directory then only tokenizes and checks the tokenizer)."""
    teacher, k, temperature = Path(config.teacher), config.teacher_top_k, config.loss.temperature  # type: ignore[arg-type]
    assert k is not None
    check_same_tokenizer(Path(config.student), teacher, vocab)
    data_key = cache_key(config.data, teacher)
    served = config.teacher_server
    who = served_identity(served) if served else checkpoint_identity(teacher)
    folder = cache_dir(who, data_key, k, temperature, vocab)
    if is_rank0():
        dtype = torch.bfloat16 if resolve_precision(config.precision, on) == "bfloat16" else None

        def source() -> TopK:  # made only when rows are missing: no teacher loaded or connected for a full cache
            return ServedTeacher(served, k, vocab).topk if served else local_topk(teacher, k, temperature, vocab, dtype)

        batch = max(config.batch_size, 4 * served.concurrency) if served else config.batch_size
        about = {**who, "temperature": temperature, "vocab": vocab, "data": data_key}
        ensure_cache(folder, train_rows, needed, source, about, batch, progress)
    barrier()
    return TeacherCache(folder)
