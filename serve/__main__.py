"""`python -m serve`: check the configuration, prepare the model if needed, start the engine, serve over HTTP."""

from __future__ import annotations

import logging
import sys


def main(argv: list[str] | None = None) -> int:
    from serve.config import parse_config

    config = parse_config(argv)
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from serve.startup import run

    try:
        return run(config)
    except KeyboardInterrupt:  # Ctrl-C before the server was up (during a first compile, say): no traceback
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # vLLM spawns worker processes that re-import the entry module
    sys.exit(main())
