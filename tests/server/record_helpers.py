"""Routing records made up for tests (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

from datetime import datetime, timezone

import torch

from retrieval.routing_record import RoutingRecord, sha256_text


def routing_record(
    request_id: str,
    counts: torch.Tensor,
    tcess_sums: torch.Tensor,
    num_tokens: int,
    *,
    task: str | None = "add",
    mode: str = "exact",
    time: datetime | None = None,
    text: str | None = None,
) -> RoutingRecord:
    """A record of ``counts`` and ``tcess_sums`` [L, E] over ``num_tokens`` tokens, written now."""
    return RoutingRecord(
        time=time or datetime.now(timezone.utc),
        request_id=request_id,
        task=task,
        mode=mode,
        num_tokens=num_tokens,
        counts=counts,
        tcess_sums=tcess_sums,
        prompt_sha256=sha256_text(text or request_id),
        retrieval_sha256=sha256_text(text or request_id),
        prompt=text,
        retrieval_text=text,
    )


def record_line(request_id: str, size: int) -> bytes:
    """The line of a small record named ``request_id``, its text padded so the line is ``size`` bytes."""
    counts, sums = torch.tensor([[1, 0], [0, 1]]), torch.tensor([[0.5, 0.0], [0.0, 0.5]])
    bare = len(routing_record(request_id, counts, sums, 1, text="").to_line())
    text = "x" * max(0, (size - bare) // 2)  # the text is stored twice: prompt and retrieval text
    return routing_record(request_id, counts, sums, 1, text=text).to_line()
