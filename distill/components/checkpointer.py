"""Training checkpoints, in a directory renamed into place once complete: either full state dicts (gathered from
FSDP2 shards) written by rank 0 as safetensors + JSON, or, for models whose full state does not fit one process,
torch.distributed.checkpoint shards that every rank writes in parallel (nothing gathered; DCP's own format, no
pickle of ours: tensors plus a metadata file). Either kind resumes at any world size: a full state is broadcast
from rank 0, DCP reshards on load. A run killed at any point resumes from its last complete checkpoint with the
same weights, optimizer moments, RNG and data position; one written under other settings is refused rather than
silently mixed into this run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file
from torch import nn

from distill.common import barrier, broadcast_object, world
from models.checkpoint import COMPLETE_MARKER, atomic_directory

SHARDED_ABOVE_PARAMS = 1_000_000_000  # a full state gathered on rank 0 is ~12 bytes a parameter (fp32 + 2 moments)
DCP_METADATA = ".metadata"  # what torch.distributed.checkpoint writes beside its shards


class CheckpointConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    every: int = Field(20, ge=1, description="steps between checkpoints (the last step always writes one)")
    keep: int = Field(2, ge=1, description="how many recent checkpoints stay on disk")
    format: Literal["auto", "full", "sharded"] = Field(
        "auto", description="full: the whole model and optimizer gathered on rank 0 into safetensors; sharded: "
                            "torch.distributed.checkpoint, each rank writing its own shards (on a volume every node "
                            "sees); auto: sharded with more than one rank and over "
                            f"{SHARDED_ABOVE_PARAMS // 10**9}B parameters. Either resumes at another world size")


class CheckpointMismatchError(ValueError):
    """A checkpoint written under other settings: resuming it would silently mix two runs."""


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state on CPU on every rank (gathered from FSDP2 shards when there are any)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


class Checkpointer:
    def __init__(self, root: Path, config: CheckpointConfig, tied_head: bool) -> None:
        self.root, self.config, self.tied_head = root, config, tied_head

    def latest(self) -> Path | None:
        done = sorted(p for p in self.root.glob("step-*") if (p / COMPLETE_MARKER).is_file())
        return done[-1] if done else None

    def due(self, step: int, total: int) -> bool:
        return step % self.config.every == 0 or step == total

    def sharded(self, model: nn.Module) -> bool:
        if self.config.format != "auto":
            return self.config.format == "sharded"
        return world()[1] > 1 and sum(p.numel() for p in model.parameters()) > SHARDED_ABOVE_PARAMS

    @staticmethod
    def state(path: Path) -> dict:
        """A checkpoint's state record (what the run was and where it stood)."""
        return json.loads((path / "state.json").read_text())

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> Path:
        """Write step `step`; `state` (JSON) records what the run was and where it stands. Collective: every rank
        calls it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        if self.sharded(model):
            return self._save_sharded(step, model, optimizer, state)
        weights = full_model_state(model)
        optim = get_optimizer_state_dict(model, optimizer,
                                         options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        path = self.root / f"step-{step:06d}"
        if world()[0] == 0:
            with atomic_directory(path, f"step {step}") as tmp:
                save_file(self._untied(weights), tmp / "model.safetensors")
                tensors, meta = _flatten_optimizer(optim)
                save_file(tensors, tmp / "optimizer.safetensors")
                save_file({"cpu": torch.get_rng_state()}, tmp / "rng.safetensors")
                (tmp / "state.json").write_text(json.dumps({"step": step, **state, "optimizer": meta}, indent=1) + "\n")
            self._drop_old(path)
        barrier()
        return path

    def _save_sharded(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> Path:
        """Every rank writes its shards into rank 0's temporary directory, which rank 0 renames once all are in."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(model, optimizer)
        path = self.root / f"step-{step:06d}"
        if world()[0] == 0:
            with atomic_directory(path, f"step {step}") as tmp:
                broadcast_object(str(tmp))
                dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=tmp)  # collective
                save_file({"cpu": torch.get_rng_state()}, tmp / "rng.safetensors")
                (tmp / "state.json").write_text(json.dumps({"step": step, **state, "format": "sharded"}, indent=1)
                                                + "\n")
            self._drop_old(path)
        else:
            tmp = Path(str(broadcast_object(None)))
            dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=tmp)
        barrier()
        return path

    def _drop_old(self, path: Path) -> None:
        old = sorted(p for p in self.root.glob("step-*") if p != path)
        for stale in old[:max(0, len(old) - (self.config.keep - 1))]:
            shutil.rmtree(stale, ignore_errors=True)

    def load(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, expected: dict[str, object],
             how_to_restart: str, names: dict[str, str] | None = None, non_default: dict | None = None) -> dict:
        """Restore `path` into model, optimizer and RNG; returns its state record. `expected` holds the values this
        run's checkpoint must have been written with, from its config or its state record (a key the checkpoint
        lacks is taken as equal; inside a section, a setting added to the code since matches while it keeps its
        default: `non_default` is `expected` without default values); `names` says how the error names a key."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        state = self.state(path)
        written = {**state, **state["config"]}
        from distill.config import same_settings  # config imports this module's CheckpointConfig

        given = expected if non_default is None else non_default
        differ = [(names or {}).get(k, k) for k, v in expected.items()
                  if k in written and not same_settings(written[k], v, given.get(k))]
        if differ:
            raise CheckpointMismatchError(
                f"{path} was written with other settings ({', '.join(differ)} differ); resume with the settings it "
                f"was written with, or {how_to_restart}")
        if (path / DCP_METADATA).is_file():
            self._load_sharded(path, model, optimizer)
            torch.set_rng_state(load_file(path / "rng.safetensors")["cpu"])
            return state
        weights = load_file(path / "model.safetensors")
        if self.tied_head:
            head = [k for k in weights if k.endswith("embed_tokens.weight")]
            weights[head[0].replace("model.embed_tokens", "lm_head")] = weights[head[0]]
        optim = _unflatten_optimizer(load_file(path / "optimizer.safetensors"), state["optimizer"])
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=world()[1] > 1)
        set_model_state_dict(model, weights, options=options)
        set_optimizer_state_dict(model, optimizer, optim, options=options)
        torch.set_rng_state(load_file(path / "rng.safetensors")["cpu"])
        return state

    @staticmethod
    def _load_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """DCP reads into this run's own (sharded or plain) state dicts: the world size may differ from the run's
        that wrote it."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optim_state = get_state_dict(model, optimizer)  # creates the optimizer's moments to fill
        loaded = {"model": model_state, "optimizer": optim_state}
        dcp.load(loaded, checkpoint_id=path)
        set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"])

    def _untied(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """safetensors refuses tensors that share memory; the tied head is rebuilt from the embedding on load."""
        out = {k: v.contiguous() for k, v in weights.items()}
        if self.tied_head:
            for key in [k for k in out if k.endswith("lm_head.weight")]:
                del out[key]
        return out


def _flatten_optimizer(optim: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    for fqn, state in optim["state"].items():
        for key, value in state.items():
            tensors[f"{fqn}::{key}"] = torch.as_tensor(value).contiguous()
    return tensors, {"param_groups": [dict(g) for g in optim["param_groups"]]}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        fqn, key = name.split("::")
        state.setdefault(fqn, {})[key] = value
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}
