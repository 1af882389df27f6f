"""How a request's experts are chosen: the one definition of a mode.

- ``pruned``: routing restricted to the task's retained set (PreMoe); nothing outside it is loaded.
- ``exact``: the model's own routing; the pattern is a prefetch hint and a miss is loaded on demand.
- ``full``: every expert, no pattern.

The runtime routes in the first two (:data:`RoutingMode`); ``full`` is served as exact routing with
every expert allowed.

A query like nothing stored (retrieval's fallback) is served in pruned mode by a :data:`Fallback`: the
general pattern, exact mode, or the full model.
"""

from __future__ import annotations

from typing import Literal, get_args

RoutingMode = Literal["pruned", "exact"]
Mode = Literal["pruned", "exact", "full"]

ROUTING_MODES: tuple[str, ...] = get_args(RoutingMode)
MODES: tuple[str, ...] = get_args(Mode)
Fallback = Literal["general", "exact", "full"]
FALLBACKS: tuple[str, ...] = get_args(Fallback)
