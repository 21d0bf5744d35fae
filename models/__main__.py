"""`python -m models list | prepare NAME | export-gguf NAME`: see the registry, make a model's checkpoint exist,
write it as a GGUF for llama.cpp."""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list registry models and whether they are prepared")
    prep = sub.add_parser("prepare", help="download/convert a registry model into $CASCADE_HOME")
    prep.add_argument("name")
    prep.add_argument("--force", action="store_true", help="rebuild even if already prepared")
    from models.gguf import QUANTS

    export = sub.add_parser("export-gguf", help="write a model or checkpoint as a GGUF for llama.cpp "
                                                "(cached under $CASCADE_HOME/gguf)")
    export.add_argument("name", help="registry name or checkpoint directory")
    export.add_argument("--quant", choices=QUANTS, default="f16",
                        help="weight format: f32, f16 (default), q8_0 or q4_1 (embeddings stay Q8_0)")
    export.add_argument("--force", action="store_true", help="export again even if a cached export is current")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from models.checkpoint import is_complete
    from models.registry import all_models, get_model

    if args.command == "list":
        for spec in all_models().values():
            state = ("config only" if spec.source == "config" else
                     "prepared" if is_complete(spec.checkpoint_dir) else "not prepared")
            print(f"{spec.name:24} {spec.family:11} {spec.dtype:9} ctx={spec.max_context:<6} {state:13} "
                  f"tools={spec.tool_format or '-':12} reasoning={spec.reasoning_format or '-':14} {spec.description}")
        return 0

    from models.downloads import DownloadError, IntegrityError
    from models.gguf import GGUFExportError, export_gguf
    from models.prepare import prepare

    try:
        if args.command == "export-gguf":
            spec = get_model(args.name)
            prepare(spec)
            path = export_gguf(spec, args.quant, force=args.force)
        else:
            path = prepare(get_model(args.name), force=args.force)
    except (KeyError, OSError, ValueError, IntegrityError, DownloadError, GGUFExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - e.g. pip cannot reach the registry: one line, not a traceback
        print(f"error: preparing {args.name} failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
