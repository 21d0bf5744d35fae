"""What a cascade stage needs on GPUs under FSDP2: memory per GPU, the fewest GPUs it fits on, compute and
GPU-hours, and what serving the teacher separately changes. Arithmetic from the planned architectures and the
recipe's settings, printed by `python -m distill cascade RECIPE --dry-run [--gpus N]`; nothing here runs a model.

Memory follows what our trainer holds (distill/train.py, distill/common.py::shard): the student in fp32 with fp32
gradients and AdamW's two moments, all sharded over the GPUs; the frozen teacher in `train.teacher_dtype` (fp32 by
default, as load_model loads it; bf16 halves it and its gathered units), sharded; each FSDP unit (a decoder layer)
gathered whole while it runs, the next one prefetched; an untied input embedding its own unit, gathered only for
its lookup and gradient (not at the activation peak); the root module (head, final norm; a tied embedding is the
head) kept gathered through the step (reshard_after_forward=False); bf16 activations, which FSDP does not shard;
the loss's logit chunks in fp32. Activation sizes are estimates (+-30%): the tensors autograd keeps per token and
layer for a Llama/Mistral block under bf16 autocast with SDPA (no [T, T] scores).

Compute counts model FLOPs as torchtitan's MFU does (6 x params per trained token for the student, 2 x params per
token for the teacher's forward, plus causal attention), and converts them to GPU-hours at an assumed model-FLOPs
utilisation: the default 35% of an H100 SXM's 989 bf16 dense TFLOPS is torchtitan's measured 33-39% MFU for Llama
3.1 8B under FSDP on 8-128 H100s (pytorch/torchtitan benchmarks/llama3_h100_202412_torchtitan.md: 5,762 tokens/s
per GPU, bf16, selective activation checkpointing). Full activation checkpointing recomputes each layer's forward:
+2 x params FLOPs per token for the student, counted as extra time.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from distill.plan import Architecture
from distill.teacher_cache import bytes_per_token

GiB = 1 << 30


class ClusterConfig(BaseModel):
    """The GPUs a recipe is planned for (`cluster:` in a recipe; `--gpus` overrides the count)."""

    model_config = ConfigDict(extra="forbid")
    gpus: int = Field(8, ge=1, le=65536, description="GPUs the stage is sharded over (FSDP2, one process each)")
    gpus_per_node: int = Field(8, ge=1, le=64)
    gpu: str = Field("H100 SXM 80GB", description="name, for the printout")
    gpu_memory_gib: float = Field(80.0, gt=0)
    usable_memory: float = Field(0.9, gt=0, le=1, description="share of GPU memory a plan may fill (the CUDA "
                                 "context, the allocator's fragmentation and NCCL buffers take the rest)")
    peak_tflops: float = Field(989.0, gt=0, description="dense bf16 TFLOPS per GPU (H100 SXM: 989)")
    mfu: float = Field(0.35, gt=0, le=1, description="assumed model-FLOPs utilisation (torchtitan measured 33-39% "
                       "for Llama 3.1 8B under FSDP on H100s)")
    teacher_top_k: int = Field(64, ge=1, description="log-probs per token a separately served teacher sends")


@dataclass(frozen=True)
class StageNeeds:
    memory: dict[str, float]  # GiB per GPU, by what holds it
    fits: bool
    min_gpus: int | None  # the fewest GPUs (a power of two, or whole nodes) it fits on; None: no count fits
    student_flops: float  # per trained token
    teacher_flops: float  # per trained token (0 with a cached teacher)
    gpu_hours: float
    teacher_gpu_hours: float  # the teacher's share, what a separate deployment would run instead
    teacher_gib: float  # GiB/GPU the teacher holds here (its shards and its gathered units)

    @property
    def total_gib(self) -> float:
        return sum(self.memory.values())


def activation_bytes_per_token_layer(arch: Architecture) -> int:
    """bf16 tensors a block keeps for backward per token: norm inputs (fp32) and outputs, q/k/v, attention output,
    the residual, gate/up/activation/product of the SwiGLU."""
    d, a = arch.hidden_size, arch.num_attention_heads * arch.head_dim
    kv = arch.num_key_value_heads * arch.head_dim
    return 2 * (5 * d + 2 * a + 2 * kv + 4 * arch.intermediate_size)


def flops_per_token(arch: Architecture, seq_len: int, train: bool) -> float:
    """Model FLOPs per token: 6N (forward + backward) or 2N (forward), plus causal attention (QK^T and AV over half
    the sequence on average)."""
    attention = 2 * 2 * arch.num_hidden_layers * arch.num_attention_heads * arch.head_dim * seq_len / 2
    return (3 if train else 1) * (2 * arch.params + attention)


def root_params(arch: Architecture) -> int:
    """What distill.common.shard's root keeps gathered: the head and final norm (tied, the embedding is the head)."""
    return arch.vocab_size * arch.hidden_size + arch.hidden_size


def memory_per_gpu(student: Architecture, teacher: Architecture | None, gpus: int, micro_batch: int, seq_len: int,
                   activation_checkpointing: bool, chunk_tokens: int, teacher_bytes: int = 4) -> dict[str, float]:
    """GiB per GPU by holder; `teacher_bytes` per teacher weight (4: fp32, 2: bf16)."""
    tokens = micro_batch * seq_len
    per_layer = activation_bytes_per_token_layer(student) * tokens
    if activation_checkpointing:  # every layer's input, plus one layer recomputed at a time
        activations = student.num_hidden_layers * 2 * student.hidden_size * tokens + per_layer
    else:
        activations = student.num_hidden_layers * per_layer
    memory = {
        "student states": 16 * student.params / gpus,  # fp32 weights + fp32 grads + AdamW m and v
        # the running and the prefetched layer, and FSDP2's root unit in our sharding
        "gathered units": 4 * (2 * student.layer_params + root_params(student)),
        "activations": activations,
        "logits": 3 * 4 * min(chunk_tokens, tokens) * student.vocab_size,  # student, teacher, gradient: one chunk
    }
    if teacher is not None:
        memory["teacher"] = teacher_bytes * teacher.params / gpus
        memory["gathered units"] += teacher_bytes * (2 * teacher.layer_params + root_params(teacher))
    return {k: v / GiB for k, v in memory.items()}


def stage_needs(student: Architecture, teacher: Architecture | None, tokens: int, seq_len: int, micro_batch: int,
                activation_checkpointing: bool, chunk_tokens: int, cluster: ClusterConfig,
                teacher_bytes: int = 4) -> StageNeeds:
    """`teacher` None: a cached teacher (top-k from disk), no forward of it during training."""

    def fits(gpus: int) -> bool:
        memory = memory_per_gpu(student, teacher, gpus, micro_batch, seq_len, activation_checkpointing, chunk_tokens,
                                teacher_bytes)
        return sum(memory.values()) <= cluster.usable_memory * cluster.gpu_memory_gib

    memory = memory_per_gpu(student, teacher, cluster.gpus, micro_batch, seq_len, activation_checkpointing,
                            chunk_tokens, teacher_bytes)
    counts = [n for n in (1, 2, 4) if n < cluster.gpus_per_node]
    counts += [cluster.gpus_per_node * 2 ** i for i in range(14)]  # then whole nodes, doubling
    min_gpus = next((n for n in counts if fits(n)), None)
    student_flops = flops_per_token(student, seq_len, train=True)
    recompute = 2 * student.params if activation_checkpointing else 0.0  # not model FLOPs: extra time
    teacher_flops = flops_per_token(teacher, seq_len, train=False) if teacher is not None else 0.0
    alone = memory_per_gpu(student, None, cluster.gpus, micro_batch, seq_len, activation_checkpointing, chunk_tokens)
    per_gpu_s = cluster.peak_tflops * 1e12 * cluster.mfu
    return StageNeeds(memory=memory, fits=fits(cluster.gpus), min_gpus=min_gpus, student_flops=student_flops,
                      teacher_flops=teacher_flops,
                      gpu_hours=tokens * (student_flops + recompute + teacher_flops) / per_gpu_s / 3600,
                      teacher_gpu_hours=tokens * teacher_flops / per_gpu_s / 3600,
                      teacher_gib=sum(memory.values()) - sum(alone.values()))


def describe_needs(needs: StageNeeds, tokens: int, cluster: ClusterConfig) -> list[str]:
    """Indented lines for the dry run: memory, fit, compute and the served-teacher alternative."""
    parts = ", ".join(f"{k} {v:.1f}" for k, v in needs.memory.items())
    limit = cluster.usable_memory * cluster.gpu_memory_gib
    fit = (f"fits ({limit:.0f} GiB usable)" if needs.fits else f"DOES NOT FIT in {limit:.0f} GiB usable")
    least = (f"fits from {needs.min_gpus} GPUs" if needs.min_gpus else "fits on no GPU count (activations and "
             "gathered units do not shrink with more GPUs): lower batch_size or seq_len, or set "
             "train.activation_checkpointing")
    days = needs.gpu_hours / cluster.gpus / 24
    lines = [f"    FSDP2 on {cluster.gpus} x {cluster.gpu}: {needs.total_gib:.1f} GiB/GPU ({parts}): {fit}; {least}",
             f"    compute: {tokens * (needs.student_flops + needs.teacher_flops):.2e} FLOPs -> "
             f"{needs.gpu_hours:,.0f} GPU-hours at {cluster.mfu:.0%} MFU of {cluster.peak_tflops:.0f} TFLOPS "
             f"({days:,.1f} days on {cluster.gpus} GPUs)"]
    if needs.teacher_flops:
        share = needs.teacher_gpu_hours / needs.gpu_hours
        rate = tokens / (needs.gpu_hours * 3600) * cluster.gpus  # trained tokens per second at this plan
        lines.append(
            f"    teacher served apart (vLLM, top-{cluster.teacher_top_k} log-probs): frees "
            f"{needs.teacher_gib:.1f} GiB/GPU here (its shards and gathered layers), moves {share:.0%} of the compute "
            f"({needs.teacher_gpu_hours:,.0f} GPU-hours) to its own deployment, and needs "
            f"{rate * bytes_per_token(cluster.teacher_top_k) / 1e9:.2f} GB/s of log-probs at this speed (cached "
            f"offline instead: {tokens * bytes_per_token(cluster.teacher_top_k) / 1e12:,.1f} TB on disk)")
    return lines
