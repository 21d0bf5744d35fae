"""A vLLM general plugin (entry point `vllm.general_plugins` in pyproject.toml): loaded by vLLM in every one of its
processes, including the spawned engine-core and worker processes where torch.compile runs. It does two things.

1. Compiled models load back. On CPU, vLLM 0.32 compiles in `DYNAMO_TRACE_ONCE` mode with stock inductor and saves
the AOT artefact, whose type is torch's `BundledAOTAutogradSerializableCallable`. Loading it back calls
`finalize_loading(vllm_config)` (`vllm/compilation/decorators.py::_try_load_aot_compiled_fn`), a method only vLLM's
own `VllmSerializableFunction` has, so every start logged "Compiling model again due to a load failure ...
'function' object has no attribute 'finalize_loading'" and recompiled for 1-2 minutes. Stock inductor artefacts need
no finalising (torch's loader has already restored them), so a no-op is exact. A patch in the server process would
not reach the spawned processes; a plugin does. It does nothing once torch or vLLM gives the class the method
(vLLM's own stock-AOT path guards with `hasattr` the same way).

2. vLLM's spawned processes die with the server. Seen here: a server killed by a signal left its engine-core
process behind, polling a queue at 60% of a core forever. A spawned vLLM process now watches its parent and sends
itself SIGTERM (which vLLM's engine core handles as a shutdown) once the parent is gone. A thread polling getppid()
rather than prctl(PR_SET_PDEATHSIG): that fires when the *thread* that spawned the child exits, and the server starts
(and restarts) engines from a worker thread.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def register() -> None:
    _die_with_parent()
    _load_stock_aot_artefacts()


def _die_with_parent() -> None:
    import multiprocessing
    import os
    import signal
    import threading
    import time

    parent = multiprocessing.parent_process()
    if parent is None or parent.pid is None:
        return  # the server process itself

    def watch() -> None:
        while os.getppid() == parent.pid:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="cascade-parent-watch", daemon=True).start()


def _load_stock_aot_artefacts() -> None:
    try:
        from torch._dynamo.aot_compile_types import BundledAOTAutogradSerializableCallable
    except ImportError:  # another torch: nothing to fix
        return
    if hasattr(BundledAOTAutogradSerializableCallable, "finalize_loading"):
        return
    BundledAOTAutogradSerializableCallable.finalize_loading = _finalize_loading  # type: ignore[attr-defined]
    log.debug("cascade: stock-inductor AOT artefacts load without finalize_loading")


def _finalize_loading(self: object, vllm_config: object) -> None:
    """Nothing to finalise: torch's loader has already restored a stock inductor artefact."""
