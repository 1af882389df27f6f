"""What the task index stores for each task of a tasks file: its query texts and extra examples."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from retrieval.tasks_file import TaskSpec

logger = logging.getLogger(__name__)


def texts_by_task(specs: Iterable[TaskSpec]) -> dict[str, list[str]]:
    """Per task, in order: each calibration prompt's query text, then the extra example queries.

    A text given twice within a task is kept once: a duplicate would take two of the k neighbour
    places and count twice in the vote. Whitespace-only texts are dropped (nothing to embed).
    """
    result: dict[str, list[str]] = {}
    for spec in specs:
        texts = [prompt.query_text for prompt in spec.calibration] + list(spec.examples)
        kept = [text for text in dict.fromkeys(texts) if text.strip()]
        if len(kept) < len(texts):
            logger.debug("task %s: %d duplicate or empty texts left out", spec.name, len(texts) - len(kept))
        result[spec.name] = kept
    return result
