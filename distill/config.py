"""The trainer's settings, in one place: `TrainSettings` is everything a recipe's `train:` section may set (each
component's own config nested under its name), `TrainConfig` adds what one run needs besides (which student,
teacher, data, budget, where to write). A cascade recipe, a `python -m distill train` YAML and the benchmark all
validate into these; unknown keys are refused at every level."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator

from distill.chat_data import ChatDataConfig
from distill.common import Precision
from distill.components.checkpointer import CheckpointConfig
from distill.components.evaluator import EvalConfig
from distill.components.lora import LoraSettings
from distill.components.lr_scheduler import OptimConfig
from distill.components.rollouts import OnPolicyConfig
from distill.data import DataConfig
from distill.losses import LossConfig
from distill.media_data import MediaDataConfig
from distill.pair_data import PairDataConfig
from distill.rl.rewards import RewardTerm
from distill.served_teacher import MAX_SERVED_TOP_K, TeacherServerConfig


def data_format(value: Any) -> str:
    """Which data config a `data:` section is: chat data says so, text data may (it is the default)."""
    found = value.get("format", "text") if isinstance(value, dict) else getattr(value, "format", "text")
    return found if found in ("text", "chat", "pairs", "media") else "text"  # an unknown one fails in DataConfig


FUSED_MIN_VOCAB = 65536  # Mistral's 131k Tekken vocabulary: where [tokens x vocab] logits dominate memory


class SFTConfig(BaseModel):
    """objective sft (distill/objectives/sft.py)."""
    model_config = ConfigDict(extra="forbid")
    teacher_weight: float | None = Field(
        None, ge=0, le=1, description="a in (1 - a) CE + a KL(teacher || student) on the assistant's tokens; default "
                                      "1 with a teacher (logit distillation alone, as Ministral 3), 0 without")

    def weight(self, has_teacher: bool) -> float:
        if self.teacher_weight is not None:
            return self.teacher_weight
        return 1.0 if has_teacher else 0.0


GPOLoss = Literal["logistic", "squared", "hinge", "exponential", "truncated_quadratic", "savage"]


class OnlinePreferenceConfig(BaseModel):
    """prefer.online: pairs sampled from the current policy each step (distill/objectives/online_preference.py)."""
    model_config = ConfigDict(extra="forbid")
    labels: Literal["arithmetic", "teacher"] = Field(
        "arithmetic", description="who prefers: a verifier by name (distill/verifiers.py: right beats wrong) or "
                                  "the teacher (p = sigmoid of its per-token log-likelihood difference / "
                                  "label_temperature)")
    temperature: float = Field(0.7, gt=0, description="sampling temperature (Ministral 3's online DPO: 0.7; top-p 1)")
    new_tokens: int = Field(32, ge=1, description="longest completion; one that never ends loses its pair")
    label_temperature: float = Field(1.0, gt=0, description="labels: teacher: the scale of its preference")
    sync_every: int = Field(1, ge=1, description="steps between pushes of the policy's weights to the engine")
    kv_cache_gib: float = Field(1.0, gt=0, description="the engine's KV cache")
    probe_tolerance: float | None = Field(None, gt=0, description="largest mean |log-prob| difference, engine vs "
                                          "trainer, after the first two pushes (default 1e-3 fp32, 0.05 bf16)")


class PreferenceConfig(BaseModel):
    """objective prefer (distill/objectives/preference.py): GPO, loss f(beta * delta) per pair."""
    model_config = ConfigDict(extra="forbid")
    loss: GPOLoss = Field("logistic", description="the convex f: logistic (DPO), squared (IPO), hinge (SLiC), "
                          "exponential, truncated_quadratic, savage")
    beta: float = Field(0.1, gt=0, description="scale of the log-ratio margin; the regularisation strength is "
                        "beta x f''(0)/|f'(0)| (logistic 1/2, squared 1, hinge 0): IPO matches DPO at about beta/2")
    average_logprobs: bool = Field(False, description="log-ratios per answer token (TRL's ipo convention) instead "
                                   "of per answer")
    sft_weight: float = Field(0.0, ge=0, description="adds this x the chosen answer's per-token NLL to each pair's "
                              "loss (TRL's rpo_alpha): keeps the chosen answers likely while the margin grows")
    online: OnlinePreferenceConfig | None = Field(None, description="sample each step's pairs from the current "
                                                  "policy (prompts from the data's pairs) and label them")
    reference: str | None = Field(None, description="checkpoint of the frozen reference policy (default: the "
                                  "student's starting weights; with LoRA the student with its adapters off, no copy)")


class KLConfig(BaseModel):
    """grpo.kl: a KL(policy || reference) penalty (distill/rl/kl.py); off by default, as in Magistral."""
    model_config = ConfigDict(extra="forbid")
    beta: float = Field(0.0, ge=0, description="its weight; 0 (Magistral) loads no reference")
    estimator: Literal["k1_reward", "k2_loss"] = Field(
        "k1_reward", description="k1_reward: beta x the sequence's log-ratio sum off its reward (exact gradient); "
                                 "k2_loss: beta x delta^2 / 2 per token in the loss (local term only)")
    reference: str | None = Field(None, description="checkpoint of the reference (default: the starting weights; "
                                  "with LoRA the student with its adapters off)")


class GRPOConfig(BaseModel):
    """objective grpo (distill/objectives/grpo.py): groups of samples per prompt, rewards, Magistral's GRPO."""
    model_config = ConfigDict(extra="forbid")
    group_size: int = Field(8, ge=2, description="samples per prompt (G)")
    new_tokens: int = Field(16, ge=1, description="longest completion (l_max)")
    temperature: float = Field(1.0, gt=0, description="sampling temperature; no top-p/top-k (a truncated support "
                               "biases the log-probs, trl#6789)")
    rewards: list[RewardTerm] = Field(default_factory=lambda: [RewardTerm(name="arithmetic")], min_length=1,
                                      description="named reward functions (distill/rl/rewards.py), summed by weight")
    advantage: Literal["magistral", "passk"] = Field(
        "magistral", description="magistral: r - mean(group); passk: the pass@k advantage (for weak policies whose "
                                 "groups are mostly all wrong)")
    pass_k: int | None = Field(None, ge=1, description="passk: k (default: group_size)")
    normalise: bool = Field(True, description="advantages to mean 0, std 1 over the step's live samples")
    loss: Literal["clipped", "asymmetric"] = Field(
        "clipped", description="clipped: PPO ratio with clip-higher; asymmetric: AsymRE -(r - V) log pi (stale "
                               "or replayed samples)")
    epsilon_low: float = Field(0.2, ge=0, lt=1, description="clip below 1 - epsilon_low")
    epsilon_high: float = Field(0.28, ge=0, description="clip above 1 + epsilon_high (clip-higher)")
    asymmetric_offset: float = Field(-0.1, le=0, description="asymmetric: V = mean(group) + this")
    normalisation: Literal["group", "tokens", "sequence"] = Field(
        "group", description="group: each group's token sum / its completion tokens (Magistral); tokens: / all "
                             "live tokens (DAPO); sequence: per-sequence means (original GRPO)")
    tis_cap: float | None = Field(2.0, gt=0, description="truncated importance weight min(pi_old / mu_engine, cap) "
                                  "per token; null turns the correction off")
    minibatches: int = Field(1, ge=1, description="optimizer steps per generation (Magistral's minibatches): "
                             "later steps train on samples of older weights, where the clip acts")
    kl: KLConfig = KLConfig()
    kd_weight: float = Field(0.0, ge=0, description="lambda x KL(teacher || student) over the vocabulary at each "
                             "sampled token, in the same loss (RL and distillation at once; needs a teacher)")
    kv_cache_gib: float = Field(1.0, gt=0, description="the rollout engine's KV cache")
    probe_tolerance: float | None = Field(None, gt=0, description="largest mean |log-prob| difference, engine vs "
                                          "trainer, after every push (default 1e-3 fp32, 0.05 bf16)")

    @model_validator(mode="after")
    def _check(self) -> GRPOConfig:
        if self.pass_k is not None and (self.advantage != "passk" or self.pass_k > self.group_size):
            raise ValueError("pass_k is for advantage passk and at most group_size" if self.advantage == "passk"
                             else "pass_k is for advantage: passk")
        names = [t.name for t in self.rewards]
        if len(set(names)) != len(names):
            raise ValueError(f"rewards: each function once, got {names}")
        return self


class TrainSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    objective: Literal["kd", "gkd", "sft", "prefer", "grpo"] = Field(
        "kd", description="the loss module over the shared loop (distill/objectives/): kd = KD from the teacher "
                          "on the data (+ optional cross-entropy; cross-entropy only without a teacher); gkd = "
                          "on-policy KD on the student's own samples for a share `on_policy.mix` of the steps; sft = "
                          "chat data, the assistant's tokens only, CE and/or KL to a teacher (`sft`); prefer = "
                          "preference pairs, a GPO loss against a frozen reference (`prefer`); grpo = the policy's "
                          "own samples of the chat data's prompts, scored by rewards (`grpo`)")
    batch_size: int = Field(8, ge=1, description="sequences per micro-batch per process")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    precision: Precision = Field(
        "auto", description="bfloat16 autocast for the transformer blocks (logits and losses stay fp32); auto: "
                            "bfloat16 where the device has native support (CUDA bf16, CPU AVX512-BF16/AMX)")
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    eval: EvalConfig = EvalConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    on_policy: OnPolicyConfig = OnPolicyConfig()
    sft: SFTConfig = SFTConfig()
    prefer: PreferenceConfig = PreferenceConfig()
    grpo: GRPOConfig = GRPOConfig()
    lora: LoraSettings | None = Field(None, description="train LoRA adapters instead of every weight "
                                      "(distill/components/lora.py); the export holds the adapter and the merged model")
    teacher_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="the live teacher's weights (KD, GRPO's KD term, online preference labels, KL in "
                               "evaluation): bfloat16 halves its memory, as vLLM serves it (its hidden states "
                               "then carry bf16 rounding; logits and losses stay fp32); float32 keeps its logits "
                               "those of its checkpoint. Preference and KL references stay fp32: their log-ratio "
                               "to the policy must start at 0")
    teacher_top_k: int | None = Field(None, ge=1, description="distill from a cache of the teacher's top-k log-probs "
                                      "+ a tail bucket (computed once, reused across runs) instead of running it")
    teacher_server: TeacherServerConfig | None = Field(
        None, description="fill the teacher_top_k cache from a served teacher (vLLM; distill/served_teacher.py: "
                          "url, model, api_key_env, concurrency) instead of running the checkpoint here; `teacher` "
                          "then only tokenizes the data and checks the tokenizer. k <= 20, loss.temperature 1")
    fused_loss: Literal["auto", "on", "off"] = Field(
        "auto", description="the fused linear distillation loss (kernels/distill_loss.py: gradients made chunk by "
                            "chunk in the forward, no recomputed logits; Triton on GPU, torch rows on CPU); auto: on "
                            f"for vocabularies of >= {FUSED_MIN_VOCAB} entries with a live teacher")
    train_only: Literal["all", "projector"] = Field(
        "all", description="projector: an audio/vision model's projector trains and its decoder stays frozen (the "
                           "adapter stage of a Voxtral-style model: distill/speech/)")
    activation_checkpointing: bool = Field(
        False, description="keep only each decoder layer's input and recompute the rest in the backward (~1/3 more "
                           "compute, activations no longer grow with depth): what real sizes need under FSDP2, which "
                           "shards weights and optimizer state but not activations (`--dry-run --gpus N` estimates)")
    attention: Literal["sdpa", "cascade"] = Field(
        "sdpa", description="cascade: our Triton attention (kernels/attention.py) for student and teacher; needs a "
                            "CUDA GPU, or TRITON_INTERPRET=1 on CPU (correct but very slow)")

    @model_validator(mode="after")
    def _sft(self) -> TrainSettings:
        # values, not which keys were given: a saved config (every field written) must validate again
        default = LossConfig()
        if self.objective == "sft" and (self.loss.kd_weight, self.loss.ce_weight) != (default.kd_weight,
                                                                                        default.ce_weight):
            raise ValueError("objective sft sets loss.kd_weight and loss.ce_weight from sft.teacher_weight (a: "
                             "(1 - a) CE + a KL); set that instead")
        if self.objective != "sft" and self.sft != SFTConfig():
            raise ValueError(f"the sft section is for objective sft, not {self.objective}")
        if self.objective != "prefer" and self.prefer != PreferenceConfig():
            raise ValueError(f"the prefer section is for objective prefer, not {self.objective}")
        if self.objective != "grpo" and self.grpo != GRPOConfig():
            raise ValueError(f"the grpo section is for objective grpo, not {self.objective}")
        if self.objective == "grpo" and self.checkpoint.every % self.grpo.minibatches:
            raise ValueError(f"checkpoint.every ({self.checkpoint.every}) must be a multiple of grpo.minibatches "
                             f"({self.grpo.minibatches}): a resumed run must sample where the interrupted one did")
        return self

    @model_validator(mode="after")
    def _served_teacher(self) -> TrainSettings:
        if self.teacher_server is None:
            return self
        if self.teacher_top_k is None:
            raise ValueError("teacher_server fills the cache of the teacher's top-k log-probs: set teacher_top_k "
                             f"(<= {MAX_SERVED_TOP_K})")
        if self.teacher_top_k > MAX_SERVED_TOP_K:
            raise ValueError(f"teacher_top_k {self.teacher_top_k} > {MAX_SERVED_TOP_K}: a served teacher gives at "
                             f"most {MAX_SERVED_TOP_K} log-probs a token")
        if self.loss.temperature != 1.0:
            raise ValueError(f"loss.temperature {self.loss.temperature}: a served teacher's log-probs are its raw "
                             "distribution (temperature 1); its top-k cannot be re-tempered")
        return self

    @model_validator(mode="after")
    def _on_policy(self) -> TrainSettings:
        if self.objective != "gkd":
            return self
        if self.teacher_top_k is not None:
            raise ValueError("objective gkd scores the student's own samples: it needs a live teacher, not "
                             "teacher_top_k (a cache of the teacher on the data)")
        if self.checkpoint.every % self.on_policy.sync_every:
            raise ValueError(f"checkpoint.every ({self.checkpoint.every}) must be a multiple of "
                             f"on_policy.sync_every ({self.on_policy.sync_every}): a resumed run must sample from "
                             "the weights the interrupted one would have")
        return self


class TrainConfig(TrainSettings):
    student: str = Field(description="checkpoint directory (or registry name) the student starts from")
    teacher: str | None = Field(None, description="teacher checkpoint; None trains with cross-entropy only")
    eval_teacher: str | None = Field(None, description="teacher for KL-to-teacher in evaluation (default: teacher, "
                                      "unless teacher_server: then none)")
    out_dir: str
    data: Annotated[Annotated[DataConfig, Tag("text")] | Annotated[ChatDataConfig, Tag("chat")]
                    | Annotated[PairDataConfig, Tag("pairs")] | Annotated[MediaDataConfig, Tag("media")],
                    Discriminator(data_format)]
    tokens: int = Field(gt=0, description="token budget; steps = tokens / tokens per step, rounded up")
    random_init: bool = Field(False, description="re-initialise the student's weights (the from-scratch baseline)")
    seed: int = 0

    def data_model(self) -> str:
        """Whose tokenizer makes the rows: text with the teacher's (the student must share it); chat data rendered
        as the model is served (the student's template and tool/reasoning formats, or `data.template`'s)."""
        if isinstance(self.data, ChatDataConfig | PairDataConfig):
            return self.data.template or self.student
        return self.teacher or self.student

    @model_validator(mode="after")
    def _answers_teacher(self) -> TrainConfig:
        """Teacher-written data comes from this run's teacher unless a source names another model."""
        if isinstance(self.data, DataConfig):
            self.data.default_answers_teacher(self.teacher)
        return self

    @model_validator(mode="after")
    def _media(self) -> TrainConfig:
        if self.data.format == "media" and (self.objective != "kd" or self.teacher_top_k is not None):
            raise ValueError("media data (audio or images) trains with objective kd and a live teacher (or none: "
                             "cross-entropy on data.train_on)")
        return self

    @model_validator(mode="after")
    def _chat(self) -> TrainConfig:
        chat = self.data.format == "chat"
        if self.objective in ("sft", "grpo") and not chat:
            raise ValueError(f"objective {self.objective} trains on conversations: it needs data.format: chat "
                             "(distill/chat_data.py)")
        if self.objective == "grpo":
            if self.data.packing:  # type: ignore[union-attr]
                raise ValueError("objective grpo takes each conversation's prompt from its own row: set "
                                 "data.packing: false")
            if (self.teacher is not None) != (self.grpo.kd_weight > 0):
                raise ValueError("grpo.kd_weight > 0 distils from a teacher: give one" if self.grpo.kd_weight
                                 else "objective grpo uses a teacher only for grpo.kd_weight > 0; use eval_teacher "
                                      "to measure KL to one")
            if self.teacher_top_k is not None:
                raise ValueError("teacher_top_k caches a teacher on the data; grpo scores its own samples")
        if chat and self.objective == "gkd":
            raise ValueError("objective gkd samples continuations of text rows; with chat data use sft or kd")
        if chat and self.teacher_top_k is not None:
            raise ValueError("teacher_top_k caches the teacher on text data; with chat data the teacher runs live")
        if self.objective == "sft" and self.teacher is None and self.sft.teacher_weight:
            raise ValueError(f"sft.teacher_weight is {self.sft.teacher_weight}: distilling needs a teacher")
        pairs = self.data.format == "pairs"
        if pairs != (self.objective == "prefer"):
            raise ValueError("objective prefer trains on preference pairs (data.format: pairs, distill/pair_data.py)"
                             if not pairs else f"data.format pairs is for objective prefer, not {self.objective}")
        online = self.prefer.online
        wants_teacher = online is not None and online.labels == "teacher"
        if self.objective == "prefer" and (self.teacher is not None) != wants_teacher:
            raise ValueError("prefer.online.labels: teacher needs a teacher to label the samples" if wants_teacher
                             else "objective prefer compares the policy with its frozen reference (prefer.reference), "
                                  "not a teacher (it labels online pairs: prefer.online.labels: teacher); use "
                                  "eval_teacher to measure KL to one")
        if self.objective == "prefer" and self.teacher_top_k is not None:
            raise ValueError("teacher_top_k caches a teacher on text data; objective prefer has no use for it")
        if online is not None and self.checkpoint.every % online.sync_every:
            raise ValueError(f"checkpoint.every ({self.checkpoint.every}) must be a multiple of "
                             f"prefer.online.sync_every ({online.sync_every}): a resumed run must sample from the "
                             "weights the interrupted one would have")
        return self

    @model_validator(mode="after")
    def _on_policy_run(self) -> TrainConfig:
        if self.objective != "gkd":
            return self
        if self.teacher is None:
            raise ValueError("objective gkd needs a teacher to score the student's samples")
        p, n, seq = self.on_policy.prompt_tokens, self.on_policy.new_tokens, self.data.seq_len
        if n is None and p >= seq:
            raise ValueError(f"on_policy.prompt_tokens ({p}) must leave room for sampled tokens in data.seq_len "
                             f"({seq})")
        if n is not None and p + n > seq:
            raise ValueError(f"on_policy.prompt_tokens + new_tokens ({p} + {n}) must fit in data.seq_len ({seq})")
        return self


# Settings a resumed run may change: where it writes, how often it evaluates and checkpoints, and implementations
# of the same function (loss, attention). Everything else must match the checkpoint it resumes.
RESUMABLE_FIELDS = ("out_dir", "eval", "checkpoint", "fused_loss", "attention", "activation_checkpointing")


def run_settings(config: TrainConfig, defaults: bool = True) -> dict[str, object]:
    """What decides a run's result (JSON values): a checkpoint must have been written with exactly these (or,
    `defaults=False`, these without the values left at their defaults: see same_settings)."""
    return config.model_dump(mode="json", exclude=set(RESUMABLE_FIELDS), exclude_defaults=not defaults)


def same_settings(old: object, now: object, non_default: object) -> bool:
    """Whether settings recorded by an earlier run (`old`) are today's (`now`, with `non_default` the same dump
    without default values). A setting added to the code since that run matches while it keeps its default (the
    run behaved as the default does): adding an option must not make finished stages retrain, re-export and so
    invalidate every stage after them. A setting that is gone, or any other difference, does not match."""
    if isinstance(now, dict):
        if not isinstance(old, dict) or set(old) - set(now):
            return False
        given = non_default if isinstance(non_default, dict) else {}
        return all(same_settings(old[k], v, given.get(k)) if k in old else k not in given for k, v in now.items())
    if isinstance(now, list):
        given = non_default if isinstance(non_default, list) and len(non_default) == len(now) else [None] * len(now)
        return (isinstance(old, list) and len(old) == len(now)
                and all(same_settings(o, n, g) for o, n, g in zip(old, now, given, strict=True)))
    return old == now


def validation_problems(error: ValidationError, root: str = "config") -> str:
    """A pydantic error as one line naming each key (`data.sources: Field required`): the tag of the data union
    (`data.text.…`, `data.chat.…`) is pydantic's, not a key the user wrote, so it is left out."""
    problems = []
    for err in error.errors():
        loc = [str(p) for p in err["loc"]]
        if len(loc) > 1 and loc[0] == "data" and loc[1] in ("text", "chat", "pairs"):
            del loc[1]
        problems.append(f"{'.'.join(loc) or root}: {err['msg']}")
    return "; ".join(problems)


def read_yaml(path: Path, error: type[ValueError]) -> dict:
    """A recipe or config file as a mapping; `error` (naming the file) when it is missing or not a YAML mapping."""
    import yaml

    if not path.is_file():
        raise error(f"recipe {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise error(f"{path}: a recipe is a mapping of keys")
    return raw
