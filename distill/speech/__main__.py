"""`python -m distill.speech [--encoder-steps N ...]`: the speech demo (distill/speech/demo.py), then its report."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from distill.speech.demo import DemoConfig, run
from distill.speech.synth import SynthError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distill.speech", description=__doc__)
    for field in dataclasses.fields(DemoConfig):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=int, default=field.default,
                            help=f"(default: {field.default})")
    parser.add_argument("--report", action="store_true", help="also measure WER and run the cascade (report.py)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = DemoConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DemoConfig)})
    try:
        model = run(config)
        print(f"voxtral-smollm2-135m: {model}")
        if args.report:
            from distill.speech.report import report

            print(report(config))
    except SynthError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
