"""The extended task suite: the six demo tasks plus four more, for the DeepSeek-V3-family demo.

The default demo keeps :data:`demo.tasks.TASKS` (its build key and cached outputs depend on it); only
builds that name the ``extended`` task set train and calibrate on these. The new tasks are chosen like
the first six, for what a small MoE learns on a CPU in minutes and what can be checked exactly:
picking one character by position (first and last letter), an order-free function of a bag of digits
(minimum) and a ten-entry lookup (double a digit).
"""

from __future__ import annotations

import random
import string
from collections.abc import Mapping
from types import MappingProxyType

from demo.tasks import TASKS, Instance, TaskSpec, _word


def _first_letter(rng: random.Random) -> Instance:
    word = _word(rng, 3, 7)
    return Instance((("word", word),), word[0])


def _last_letter(rng: random.Random) -> Instance:
    word = _word(rng, 3, 7)
    return Instance((("word", word),), word[-1])


def _min_digit(rng: random.Random) -> Instance:
    digits = _word(rng, 4, 7, string.digits)
    return Instance((("digits", digits),), min(digits))


def _double(rng: random.Random) -> Instance:
    # A digit alone has ten problems: a two-digit tag keeps the splits disjoint by problem.
    d, tag = rng.randint(0, 9), rng.randint(10, 99)
    return Instance((("d", str(d)), ("tag", str(tag))), str(2 * d))


EXTRA_TASKS: tuple[TaskSpec, ...] = (
    TaskSpec(
        name="first_letter",
        description="the first letter of a word",
        sample=_first_letter,
        phrasings=(
            "First letter of {word}?",
            "first: {word}",
            "What letter does {word} start with?",
            "Give the initial of {word}.",
            "Which letter begins {word}?",
        ),
        heldout_phrasings=(
            "The word '{word}' opens with which letter?",
            "Name the leading character of {word}.",
        ),
    ),
    TaskSpec(
        name="last_letter",
        description="the last letter of a word",
        sample=_last_letter,
        phrasings=(
            "Last letter of {word}?",
            "last: {word}",
            "What letter does {word} end with?",
            "Give the final letter of {word}.",
            "Which letter ends {word}?",
        ),
        heldout_phrasings=(
            "The word '{word}' closes with which letter?",
            "Name the trailing character of {word}.",
        ),
    ),
    TaskSpec(
        name="min_digit",
        description="the smallest digit of a number",
        sample=_min_digit,
        phrasings=(
            "Smallest digit in {digits}?",
            "min: {digits}",
            "What is the lowest digit of {digits}?",
            "Find the minimum digit in {digits}.",
            "Which digit of {digits} is least?",
        ),
        heldout_phrasings=(
            "Tell me the bottom digit among {digits}.",
            "{digits}: which digit is tiniest?",
        ),
    ),
    TaskSpec(
        name="double",
        description="twice a digit (the item number is only a label)",
        sample=_double,
        phrasings=(
            "Item {tag}: double {d}.",
            "double {d} (#{tag})",
            "#{tag} What is twice {d}?",
            "Item {tag}: multiply {d} by 2.",
            "#{tag} {d} times two?",
        ),
        heldout_phrasings=(
            "Case {tag}: if one box holds {d} pens, how many do two boxes hold?",
            "Case {tag}: what do you get when {d} is added to itself?",
        ),
    ),
)

TASK_SETS: Mapping[str, tuple[TaskSpec, ...]] = MappingProxyType(
    {"default": TASKS, "extended": TASKS + EXTRA_TASKS}
)


def task_set(name: str) -> tuple[TaskSpec, ...]:
    """The tasks of the set ``name`` (``default`` or ``extended``)."""
    if name not in TASK_SETS:
        raise ValueError(f"unknown task set {name!r}; choose one of {', '.join(TASK_SETS)}")
    return TASK_SETS[name]
