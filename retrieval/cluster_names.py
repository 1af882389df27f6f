"""Names for discovered tasks: the words that a cluster's most central prompts share and others lack.

A word (letters only, three or more, not an English stop word) scores its share among the cluster's
``central`` most central prompts minus its share among the other clusters' prompts; the best
``words`` of those in at least a quarter of the central prompts, joined by ``_``, name the task
(``reverse_backwards``). Words of a request's content (the string to reverse, a name) are rarely
shared by a quarter of a cluster, so the instruction's words win. A name already taken, or reserved
(``general``, ``full``, ``exact``), gets a numeric suffix; a cluster with no such word is ``task``.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

from retrieval.tasks_file import RESERVED_NAMES, check_task_name

_WORD = re.compile(r"[a-z]{3,}")
_MIN_SHARE = 0.25
_MAX_LENGTH = 48


def cluster_names(
    texts: Sequence[str], clusters: Sequence[Sequence[int]], central: int = 20, words: int = 2
) -> list[str]:
    """One unique, valid task name per cluster; each cluster lists indices into ``texts``, most
    central first."""
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    bags = {i: _words(texts[i], ENGLISH_STOP_WORDS) for cluster in clusters for i in cluster}
    names: list[str] = []
    for c, cluster in enumerate(clusters):
        others = [i for d, other in enumerate(clusters) if d != c for i in other]
        slug = _slug([bags[i] for i in cluster[:central]], [bags[i] for i in others], words)
        names.append(_unique(slug, names))
    return names


def _words(text: str, stop_words: frozenset[str]) -> frozenset[str]:
    return frozenset(word for word in _WORD.findall(text.lower()) if word not in stop_words)


def _slug(inside: list[frozenset[str]], outside: list[frozenset[str]], words: int) -> str:
    share_in = _shares(inside)
    share_out = _shares(outside)
    scores = {
        word: share - share_out.get(word, 0.0)
        for word, share in share_in.items()
        if share >= _MIN_SHARE and share > share_out.get(word, 0.0)
    }
    best = sorted(scores, key=lambda word: (-scores[word], word))[:words]
    return "_".join(best)[:_MAX_LENGTH].rstrip("_") or "task"


def _shares(bags: list[frozenset[str]]) -> dict[str, float]:
    counts = Counter(word for bag in bags for word in bag)
    return {word: count / len(bags) for word, count in counts.items()} if bags else {}


def _unique(slug: str, taken: list[str]) -> str:
    name, n = slug, 1
    while name in taken or name.lower() in RESERVED_NAMES:
        n += 1
        name = f"{slug}_{n}"
    return check_task_name(name, where="discovered task name")
