"""llama.cpp's own HTTP server (`llama-server`, as the xllamacpp wheel embeds it) on a TCP port: the peer that
`make bench-serve` compares cascade against, on the same GGUF with the same threads, slots and context.

    python -m serve.llamacpp_peer --gguf PATH --port 8081 --threads 2 --parallel 32 --ctx 65536
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading


def main(argv: list[str] | None = None) -> int:
    import xllamacpp

    p = argparse.ArgumentParser(prog="python -m serve.llamacpp_peer", description=__doc__)
    p.add_argument("--gguf", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--alias", default=None, help="the model name the server answers to")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--parallel", type=int, default=32)
    p.add_argument("--ctx", type=int, default=65536)
    p.add_argument("--draft-gguf", default=None)
    p.add_argument("--num-draft-tokens", type=int, default=3)
    args = p.parse_args(argv)
    params = xllamacpp.CommonParams()
    params.model.path = args.gguf
    params.hostnames = ["127.0.0.1"]
    params.port = args.port
    params.n_parallel = args.parallel
    params.n_ctx = args.ctx
    params.kv_unified = True
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads
    params.endpoint_metrics = True
    params.ui = False
    if args.alias:
        params.model_alias = {args.alias}
    if args.draft_gguf:
        params.speculative.types = [xllamacpp.common_speculative_type.COMMON_SPECULATIVE_TYPE_DRAFT_SIMPLE]
        params.speculative.draft.mparams.path = args.draft_gguf
        params.speculative.draft.n_max = args.num_draft_tokens
    server = xllamacpp.Server(params)
    print(f"llama.cpp server listening on {server.listening_address}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # llama.cpp installed its own handlers; take them back
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    del server
    return 0


if __name__ == "__main__":
    sys.exit(main())
