"""`python -m serve`: prepare the model if needed, then serve it over HTTP."""

from __future__ import annotations

import dataclasses
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    from serve.config import parse_config

    config = parse_config(argv)
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("serve")

    from models.checkpoint import MissingCheckpointError, UnsafeCheckpointError
    from models.prepare import prepare
    from models.registry import UnknownModelError, get_model

    try:
        spec = get_model(config.model)
        prepare(spec, allow_pickle=config.allow_pickle)
        overrides = {k: getattr(config, k) for k in ("tool_format", "reasoning_format") if getattr(config, k)}
        spec = dataclasses.replace(spec, **overrides)
    except (UnknownModelError, MissingCheckpointError, UnsafeCheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import uvicorn

    from serve.app import create_app
    from serve.vllm_engine import VLLMEngine, VLLMSettings

    engine = VLLMEngine(spec, VLLMSettings(max_model_len=config.max_model_len, dtype=config.dtype,
                                           enforce_eager=config.enforce_eager, max_num_seqs=config.max_num_seqs))
    app = create_app(engine, api_key=config.api_key, max_pending_requests=config.max_pending_requests,
                     reasoning_content=config.reasoning_content)
    log.info("cascade server for %s on http://%s:%d (auth %s, tools %s, reasoning %s)", spec.name, config.host,
             config.port, "on" if config.api_key else "off", spec.tool_format, spec.reasoning_format)
    uvicorn.run(app, host=config.host, port=config.port, log_level=config.log_level)
    return 0


if __name__ == "__main__":  # vLLM spawns worker processes that re-import the entry module
    sys.exit(main())
