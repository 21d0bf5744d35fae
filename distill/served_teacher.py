"""A teacher served apart: a vLLM deployment (our server, or vLLM's own) asked for the top-k log-probs of every
training token, written into the offline teacher cache's rows (distill/teacher_cache.py), so the trainer never
holds the teacher's weights and the two deployments scale on their own (deploy/README.md, "Where the teacher runs").

One request per training row: POST /v1/completions with the row's token ids as the prompt, `echo` and `logprobs: k`
(the prompt's log-probs: position t's top-k given tokens < t) and vLLM's `return_tokens_as_token_ids`, so every
alternative comes back as its id. The served log-probs are the model's raw distribution (temperature 1) over its
whole vocabulary; the tail bucket is what the top k leave. Requests run `concurrency` at a time and are retried on
connection errors, 429 and 5xx (Retry-After honoured); any other refusal stops the run with the server's message.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from distill.answers import EndpointError, auth_headers, served_models

MAX_SERVED_TOP_K = 20  # vLLM's default --max-logprobs, and our server's bound (serve/protocol.py MAX_TOP_LOGPROBS)
RETRIES = 5


class ServedTeacherError(EndpointError):
    """The served teacher refused or could not answer; the message says what it said."""


class TeacherServerConfig(BaseModel):
    """`train.teacher_server`: where the teacher is served (the cache is keyed on url + model)."""

    model_config = ConfigDict(extra="forbid")
    url: str = Field(description="base URL of the OpenAI-compatible server, e.g. http://teacher:8000")
    model: str = Field(min_length=1, description="the served model's name (its /v1/models id)")
    api_key_env: str | None = Field(None, description="environment variable holding the server's API key "
                                    "(never the key itself in a config)")
    concurrency: int = Field(4, ge=1, le=256, description="requests in flight (the server batches them)")
    timeout_s: float = Field(600.0, gt=0, description="per request")

    @field_validator("url")
    @classmethod
    def _http(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"want an http(s):// URL, got {v!r}")
        return v.rstrip("/")

    def api_key(self) -> str | None:
        if self.api_key_env is None:
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            raise ServedTeacherError(f"teacher_server.api_key_env names {self.api_key_env}, which is not set")
        return key


def _row_topk(body: dict, row: list[int], k: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """([T-1, k] ids, [T-1, k] log-probs, [T-1] tail) from one echo response: entry t + 1 predicts token t + 1."""
    try:
        tops = body["choices"][0]["logprobs"]["top_logprobs"]
    except (KeyError, IndexError, TypeError) as e:
        raise ServedTeacherError(f"the served teacher's answer has no choices[0].logprobs.top_logprobs: {e}") from e
    if len(tops) < len(row):
        raise ServedTeacherError(f"the served teacher gave {len(tops)} prompt log-probs for {len(row)} tokens: is "
                                 "it a vLLM server (echo with logprobs)?")
    ids, logprobs = torch.zeros(len(row) - 1, k, dtype=torch.int32), torch.zeros(len(row) - 1, k)
    for t, top in enumerate(tops[1:len(row)]):
        best = sorted(top.items(), key=lambda item: -item[1])[:k]
        if len(best) < k:
            raise ServedTeacherError(f"the served teacher gave {len(best)} alternatives at position {t + 1}, not "
                                     f"{k}: start it with --max-logprobs >= {k}")
        for j, (name, lp) in enumerate(best):
            if not name.startswith("token_id:"):
                raise ServedTeacherError(f"the served teacher named a token {name!r}, not 'token_id:N': it ignores "
                                         "return_tokens_as_token_ids (serve it with vLLM or `python -m serve`)")
            token = int(name.removeprefix("token_id:"))
            if token >= vocab:
                raise ServedTeacherError(f"the served teacher ranks token id {token} among its top {k}, beyond the "
                                         f"student's vocabulary ({vocab}): serve a teacher with the student's")
            ids[t, j], logprobs[t, j] = token, lp
    mass = logprobs.logsumexp(-1).clamp(max=-1e-7)  # the top k's probability, < 1
    tail = torch.log(-torch.expm1(mass)).clamp_min(-80.0)  # log(1 - p(top k)), as losses._tail clamps it
    return ids, logprobs, tail


def _retry_after(header: str | None, attempt: int) -> float:
    """The server's Retry-After in seconds (an HTTP date counts as absent), else exponential; at most a minute."""
    try:
        wait = float(header) if header is not None else 2.0 ** attempt
    except ValueError:
        wait = 2.0 ** attempt
    return min(max(wait, 0.0), 60.0)


class ServedTeacher:
    """Top-k log-probs of training rows from a served teacher; `topk(rows)` has the shape of the local one."""

    def __init__(self, config: TeacherServerConfig, k: int, vocab: int) -> None:
        if k > MAX_SERVED_TOP_K:
            raise ServedTeacherError(f"teacher_top_k {k} > {MAX_SERVED_TOP_K}: servers give at most "
                                     f"{MAX_SERVED_TOP_K} log-probs a token")
        self.config, self.k, self.vocab = config, k, vocab
        key = config.api_key()
        served = served_models(config.url, key)
        if config.model not in served:
            raise ServedTeacherError(f"{config.url} serves {served}, not {config.model!r}")
        self.client = httpx.Client(base_url=config.url, headers=auth_headers(key), timeout=config.timeout_s)

    def _post(self, row: list[int]) -> dict:
        body = {"model": self.config.model, "prompt": row, "max_tokens": 1, "temperature": 0.0, "echo": True,
                "logprobs": self.k, "return_tokens_as_token_ids": True}
        for attempt in range(RETRIES + 1):
            try:
                r = self.client.post("/v1/completions", json=body)
            except httpx.TransportError as e:
                if attempt == RETRIES:
                    raise ServedTeacherError(f"the served teacher at {self.config.url} failed {RETRIES + 1} "
                                             f"times: {e}") from e
                time.sleep(2 ** attempt)
                continue
            if r.status_code == 200:
                return r.json()
            if (r.status_code == 429 or r.status_code >= 500) and attempt < RETRIES:
                time.sleep(_retry_after(r.headers.get("Retry-After"), attempt))
                continue
            raise ServedTeacherError(f"the served teacher refused a row ({r.status_code}): {r.text[:500]}")
        raise AssertionError("unreachable")

    def topk(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """rows [B, T] -> ([B, T-1, k] int32 ids, [B, T-1, k] log-probs, [B, T-1] tail log-probs)."""
        lists = rows.tolist()
        with ThreadPoolExecutor(min(self.config.concurrency, len(lists))) as pool:
            bodies = list(pool.map(self._post, lists))
        parts = [_row_topk(body, row, self.k, self.vocab) for body, row in zip(bodies, lists, strict=True)]
        return tuple(torch.stack(p) for p in zip(*parts, strict=True))  # type: ignore[return-value]


def served_identity(config: TeacherServerConfig) -> dict[str, str]:
    """What keys a served teacher's cache: where and what (redeploy under a new name to start a fresh cache)."""
    return {"served": config.url, "model": config.model}

