"""`python -m distill cascade RECIPE.yaml` | `sft|prefer|posttrain RECIPE.yaml` (post-training) | `corpus RECIPE.yaml` |
`train CONFIG.yaml` | `plan --model M --params 100M` | `answers PROMPTS.jsonl OUT.jsonl --teacher M` (chat data: the
teacher's answers, through our server) | `arithmetic OUT_DIR` (the generated arithmetic task's files).

Runs the same under `torchrun --nproc-per-node N -m distill ...` (FSDP2; gloo on CPU, NCCL on GPUs).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


def _parse_dims(items: list[str]) -> dict[str, int]:
    dims = {}
    for item in items:
        key, _, value = item.partition("=")
        if not value.isdigit():
            raise ValueError(f"--dims takes name=integer pairs, got {item!r}")
        dims[key] = int(value)
    return dims


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distill", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    cascade = sub.add_parser("cascade", help="run a recipe: prune -> distill -> evaluate -> register, per stage")
    cascade.add_argument("recipe", type=Path)
    cascade.add_argument("--runs", type=Path, help="working directory (default $CASCADE_HOME/runs/<recipe name>)")
    cascade.add_argument("--dry-run", action="store_true", help="check the recipe and print the plan only")
    cascade.add_argument("--gpus", type=int, help="with --dry-run: plan for this many GPUs (the recipe's cluster: "
                         "section, or an 8 x H100 80GB default, for the rest): memory per GPU under FSDP2, the "
                         "fewest GPUs each stage fits on, GPU-hours")
    for name, what in (("sft", "on chat data (SFT, optionally with logit distillation)"),
                       ("prefer", "on preference pairs (GPO: DPO, IPO, SLiC, ... against a frozen reference)"),
                       ("grpo", "by GRPO on its own samples of the data's prompts, scored by named rewards"),
                       ("posttrain", "with the recipe's train.objective (default sft)")):
        command = sub.add_parser(name, help=f"post-train a model {what}, then register it")
        command.add_argument("recipe", type=Path)
        command.add_argument("--runs", type=Path, help="working directory (default $CASCADE_HOME/runs/<recipe name>)")
        command.add_argument("--dry-run", action="store_true", help="check the recipe and print the run's settings")
    arithmetic = sub.add_parser("arithmetic", help="write the arithmetic task: SFT conversations per split and the "
                                "held-out problems")
    arithmetic.add_argument("out", type=Path)
    arithmetic.add_argument("--digits", type=int, default=1, choices=[1, 2, 3])
    arithmetic.add_argument("--seed", type=int, default=0)
    corpus = sub.add_parser("corpus", help="make a recipe's teacher-written data (kind: answers) now")
    corpus.add_argument("recipe", type=Path)
    corpus.add_argument("--endpoint", help="a running server for the teacher (default: start ours, vLLM engine)")
    corpus.add_argument("--api-key", default=os.environ.get("CASCADE_API_KEY"), help="for --endpoint")
    train = sub.add_parser("train", help="distill one student from a TrainConfig YAML")
    train.add_argument("config", type=Path)
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint in out_dir")
    plan = sub.add_parser("plan", help="print the child architecture for a target")
    plan.add_argument("--model", required=True, help="registry name or checkpoint directory")
    plan.add_argument("--params", help="target parameter count, e.g. 100M")
    plan.add_argument("--dims", nargs="*", default=[], help="explicit dims, e.g. num_hidden_layers=24")
    plan.add_argument("--axes", nargs="*", default=["intermediate_size", "num_hidden_layers"],
                      help="dims a --params target may shrink (also: hidden_size)")
    plan.add_argument("--tied-embeddings", choices=["untie", "approximate"], default="untie")
    answers = sub.add_parser("answers", help="write the teacher's answers to a file of prompts (chat KD data)")
    answers.add_argument("prompts", type=Path, help='JSONL: {"prompt": "..."} or {"messages": [...]} per line')
    answers.add_argument("out", type=Path, help="JSONL of {\"messages\": [..., assistant answer]} (resumable)")
    where = answers.add_mutually_exclusive_group(required=True)
    where.add_argument("--teacher", help="registry name or checkpoint: start our server for it, then stop it")
    where.add_argument("--endpoint", help="base URL of a running OpenAI-compatible server, e.g. http://127.0.0.1:8000")
    answers.add_argument("--api-key", default=os.environ.get("CASCADE_API_KEY"), help="for --endpoint")
    answers.add_argument("--max-tokens", type=int, default=256)
    answers.add_argument("--temperature", type=float, default=0.0)
    answers.add_argument("--concurrency", type=int, default=8)
    answers.add_argument("--seed", type=int, default=0)
    answers.add_argument("--server-args", default="", help="extra flags for the teacher's server, e.g. "
                         "'--max-model-len 4096 --dtype bfloat16'")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would bury the progress bar

    import yaml
    from pydantic import ValidationError

    from distill.answers import AnswerSettings, EndpointError, answer_with_teacher, write_answers
    from distill.cascade import (
        RecipeError,
        describe_plan,
        load_recipe,
        parent_chain,
        parse_count,
        plan_recipe,
        run_recipe,
    )
    from distill.common import close_distributed, init_distributed, is_rank0
    from distill.config import TrainConfig, validation_problems
    from distill.corpus import answers_file, prepare_sources
    from distill.data import DataError
    from distill.losses import VocabMismatchError
    from distill.model_io import UnsupportedModelError, load_config
    from distill.plan import Architecture, PlanError, plan_architecture
    from distill.posttrain import load_recipe_chain, run_config, run_posttrain
    from distill.resources import ClusterConfig
    from distill.train import Trainer, TrainingDivergedError
    from models.prepare import prepare
    from models.registry import UnknownModelError, get_model

    try:
        if args.command == "plan":
            parent = Architecture.of(load_config(prepare(get_model(args.model))))
            params = parse_count(args.params) if args.params else None
            child = plan_architecture(parent, _parse_dims(args.dims), params, tuple(args.axes), args.tied_embeddings)
            print(f"parent: {parent.describe()}\nchild:  {child.describe()}")
            return 0
        if args.command == "answers":
            settings = AnswerSettings(max_tokens=args.max_tokens, temperature=args.temperature,
                                      concurrency=args.concurrency, seed=args.seed)
            if args.teacher:
                counts = answer_with_teacher(args.prompts, args.out, args.teacher, settings, args.server_args.split())
            else:
                counts = write_answers(args.prompts, args.out, args.endpoint.rstrip("/"), args.api_key, settings)
            print(f"{counts['answers']} answers ({counts['truncated']} cut at --max-tokens) -> {args.out}")
            return 0
        if args.command == "arithmetic":
            from distill.arithmetic import write_task

            for name, count in write_task(args.out, args.digits, args.seed).items():
                print(f"{count:6d} {args.out / name}")
            return 0
        if args.command in ("sft", "prefer", "grpo", "posttrain"):
            chain = load_recipe_chain(args.recipe, None if args.command == "posttrain" else args.command)
            if args.dry_run:
                for done in chain[:-1]:
                    print(f"# first: {done.name} ({done.train.objective}, from {done.model})")
                try:
                    config = run_config(chain[-1], args.runs)
                except UnknownModelError:  # its start is the result of a recipe before it, not made yet
                    print(f"# then {chain[-1].name} from {chain[-1].model} (its settings print once that exists)")
                    return 0
                print(yaml.safe_dump(config.model_dump(mode="json", exclude_defaults=True), sort_keys=False), end="")
                return 0
            init_distributed()
            for recipe in chain:  # --runs is the last recipe's; those before it use their own default
                run_posttrain(recipe, args.runs if recipe is chain[-1] else None)
            return 0
        if args.command == "corpus":
            recipe = load_recipe(args.recipe)
            prepare_sources(recipe.data, endpoint=args.endpoint.rstrip("/") if args.endpoint else None,
                            api_key=args.api_key)
            for source in recipe.data.sources:
                if source.kind == "answers":
                    print(f"{answers_file(source)}\n{(answers_file(source).parent / 'card.json').read_text()}")
            return 0
        if args.command == "cascade":
            recipe = load_recipe(args.recipe)
            if args.dry_run:
                for made in parent_chain(recipe):
                    print(f"# first: {made.name} ({made.train.objective}, from {made.model})")
                _, plans = plan_recipe(recipe)
                cluster = recipe.cluster
                if args.gpus is not None:
                    cluster = ClusterConfig.model_validate({**(cluster or ClusterConfig()).model_dump(),
                                                            "gpus": args.gpus})
                print("\n".join(describe_plan(recipe, recipe.parent, plans, cluster)))
                return 0
            init_distributed()
            run_recipe(recipe, args.runs)
            return 0
        if not args.config.is_file():
            raise RecipeError(f"config {args.config} does not exist")
        config = TrainConfig.model_validate(yaml.safe_load(args.config.read_text()))
        init_distributed()
        if is_rank0() and config.data.format == "text":
            prepare_sources(config.data)
        final = Trainer(config).train(resume=args.resume)
        print(" ".join(f"{k}={v:.4f}" for k, v in final.items()))
        return 0
    except TrainingDivergedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ValidationError as e:
        print(f"error: {args.command} config: {validation_problems(e)}", file=sys.stderr)
        return 2
    except (RecipeError, PlanError, EndpointError, DataError, VocabMismatchError, UnsupportedModelError, KeyError,
            OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        close_distributed()


if __name__ == "__main__":
    sys.exit(main())
