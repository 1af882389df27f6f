"""Reloading the patterns of a running server: ``POST /v1/taer/reload`` and SIGHUP both call
:func:`reload_patterns`.

The engine re-reads its patterns directory (the one `taer serve --patterns` names: a client cannot
point the server at another path), checks it whole and swaps its router between two steps
(``server/engine.py``); a directory that fails a check is refused with a :class:`TaerError` naming
the fault, and the old patterns go on serving. The HTTP route answers that with a 400; SIGHUP logs
it. Replicas on Ray Serve do not reload: there, ``/v1/taer/reload`` answers 400 saying so.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, Protocol, runtime_checkable

from fastapi import FastAPI

from expert_store.errors import TaerError

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PatternsReloaded:
    """A reload's outcome: the creation time of the patterns now serving and of those before, the
    tasks, and whether the router check is on with them."""

    created: str
    previous: str
    tasks: list[str]
    router_check: bool

    def to_json(self) -> dict[str, Any]:
        return {"reloaded": True} | asdict(self)


@runtime_checkable
class ReloadableEngine(Protocol):
    async def reload_patterns(self) -> PatternsReloaded: ...


async def reload_patterns(app: FastAPI) -> PatternsReloaded:
    """Reload ``app``'s engine's patterns; :class:`TaerError` (the old ones kept) if it cannot."""
    engine = app.state.engine
    if not isinstance(engine, ReloadableEngine):
        raise TaerError(
            "this server cannot reload its patterns (replicas on Ray Serve load them at start); "
            "restart it to serve new patterns"
        )
    result = await engine.reload_patterns()
    app.openapi_schema = None  # its task names are the old patterns'
    return result


async def reload_on_signal(app: FastAPI) -> None:
    """SIGHUP's reload: the outcome goes to the log."""
    logger.info("SIGHUP: reloading the patterns")
    try:
        result = await reload_patterns(app)
    except TaerError as error:
        logger.error("SIGHUP: patterns not reloaded, the old ones still serve: %s", error)
        return
    except Exception:
        logger.exception("SIGHUP: patterns not reloaded, the old ones still serve")
        return
    logger.info("SIGHUP: now serving the patterns created %s (tasks: %s)", result.created, result.tasks)
