"""Watch the engine; when it dies, exit so a process supervisor restarts the server (default, as vLLM's own server
does), or restart the engine in-process with back-off (`--restart-engine`). /health reports which state it is in."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

from serve.engine import Engine

log = logging.getLogger(__name__)

State = Literal["ok", "restarting", "dead"]
EXIT_ENGINE_DEAD = 3  # the server's exit status when its engine died and it was not asked to restart it


class EngineSupervisor:
    def __init__(self, engine: Engine, restart: bool, on_fatal: Callable[[int], None], check_every_s: float = 1.0,
                 max_backoff_s: float = 60.0) -> None:
        self.engine = engine
        self.restart = restart
        self.on_fatal = on_fatal
        self.check_every_s = check_every_s
        self.max_backoff_s = max_backoff_s
        self.state: State = "ok"
        self.restarts = 0
        self.last_error: str | None = None

    @contextlib.asynccontextmanager
    async def watching(self) -> AsyncIterator[None]:
        task = asyncio.ensure_future(self._watch())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.check_every_s)
            if await self.engine.is_healthy():
                continue
            if not self.restart:
                self.state = "dead"
                log.error("the %s engine died; exiting with status %d so that a supervisor restarts the server "
                          "(or run with --restart-engine to restart it in-process)", self.engine.name,
                          EXIT_ENGINE_DEAD)
                self.on_fatal(EXIT_ENGINE_DEAD)
                return
            await self._restart()

    async def _restart(self) -> None:
        self.state = "restarting"
        delay = 1.0
        while True:
            log.warning("the %s engine died; restarting it (attempt after %d restarts)", self.engine.name,
                        self.restarts)
            with contextlib.suppress(Exception):  # release what is left of the dead engine, off the event loop
                await asyncio.to_thread(self.engine.shutdown)
            started = time.monotonic()
            try:
                await self.engine.start()
            except Exception as e:  # noqa: BLE001 - any failure: wait and try again
                self.last_error = f"{type(e).__name__}: {e}"
                log.error("engine restart failed (%s); next try in %.0f s", self.last_error, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_backoff_s)
                continue
            self.restarts += 1
            self.state = "ok"
            log.info("engine restarted in %.1f s (restart %d)", time.monotonic() - started, self.restarts)
            return

    def health(self, healthy: bool) -> tuple[int, dict[str, Any]]:
        """(HTTP status, body) for /health: 200 only while the engine answers and no restart is under way."""
        status = self.state if self.state != "ok" else ("ok" if healthy else "dead")
        body = {"status": status, "engine": self.engine.name, "restarts": self.restarts,
                "on_engine_death": "restart" if self.restart else "exit"}
        return (200 if status == "ok" else 503), body
