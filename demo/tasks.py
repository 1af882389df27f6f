"""The demo's tasks: seeded problem generators, natural-language phrasings and exact-match scorers.

Each task draws problems whose answer is a pure function of the problem, so a prediction can be checked
exactly. The tasks are chosen for what a 10M-parameter MoE learns in minutes on a CPU: copying with a
per-character map (upper-case, shift), copying backwards (reverse), order-free functions of a bag of
digits (sort, maximum) and single-carry addition. Counting letters, two-digit addition and
multiplication were tried and stayed near chance in that budget. Letter tasks differ in the map the
feed-forward layers apply and digit tasks in their operand alphabet, so the router has reasons to send
tasks to different experts.

Every task has training phrasings (used for training, calibration and evaluation prompts) and
held-out phrasings, which appear only in the held-out split: that split measures whether retrieval
recognises a task worded in a way it never saw.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

Scorer = Callable[[str, str], bool]


def exact_match(prediction: str, answer: str) -> bool:
    """True when the prediction is the answer, ignoring surrounding whitespace (case-sensitive)."""
    return prediction.strip() == answer.strip()


@dataclass(frozen=True, slots=True)
class Instance:
    """One problem: the values its phrasings are filled with, and the exact answer.

    Two instances with the same ``values`` are the same problem, whatever the wording; splits are
    disjoint in this sense.
    """

    values: tuple[tuple[str, str], ...]
    answer: str

    def render(self, phrasing: str) -> str:
        """The query: ``phrasing`` with this problem's values filled in."""
        return phrasing.format(**dict(self.values))


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """A task: how to draw a problem, how to ask for it, and how to check an answer."""

    name: str
    description: str
    sample: Callable[[random.Random], Instance]
    phrasings: tuple[str, ...]
    heldout_phrasings: tuple[str, ...]
    score: Scorer = exact_match

    def __post_init__(self) -> None:
        assert len(self.phrasings) >= 4 and len(self.heldout_phrasings) >= 2, self.name
        assert not set(self.phrasings) & set(self.heldout_phrasings), self.name


def _word(rng: random.Random, low: int, high: int, alphabet: str = string.ascii_lowercase) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(low, high)))


def _reverse(rng: random.Random) -> Instance:
    word = _word(rng, 3, 6)
    return Instance((("word", word),), word[::-1])


def _upper(rng: random.Random) -> Instance:
    word = _word(rng, 3, 7)
    return Instance((("word", word),), word.upper())


def _shift(rng: random.Random) -> Instance:
    word = _word(rng, 3, 6)
    shifted = "".join(chr((ord(c) - ord("a") + 1) % 26 + ord("a")) for c in word)
    return Instance((("word", word),), shifted)


def _sort_digits(rng: random.Random) -> Instance:
    digits = _word(rng, 4, 7, string.digits)
    return Instance((("digits", digits),), "".join(sorted(digits)))


def _max_digit(rng: random.Random) -> Instance:
    digits = _word(rng, 4, 7, string.digits)
    return Instance((("digits", digits),), max(digits))


def _add(rng: random.Random) -> Instance:
    a, b = rng.randint(0, 99), rng.randint(0, 9)
    return Instance((("a", str(a)), ("b", str(b))), str(a + b))


TASKS: tuple[TaskSpec, ...] = (
    TaskSpec(
        name="reverse",
        description="reverse a lower-case word",
        sample=_reverse,
        phrasings=(
            "Reverse {word}.",
            "reverse: {word}",
            "Write {word} backwards.",
            "Spell {word} in reverse.",
            "What is {word} reversed?",
        ),
        heldout_phrasings=(
            "Flip the letters of '{word}' around.",
            "Read {word} from right to left.",
        ),
    ),
    TaskSpec(
        name="upper",
        description="upper-case a word",
        sample=_upper,
        phrasings=(
            "Uppercase {word}.",
            "upper: {word}",
            "Write {word} in capitals.",
            "Capitalize {word}.",
            "What is {word} in caps?",
        ),
        heldout_phrasings=(
            "Shout the word '{word}'.",
            "Put {word} in block letters.",
        ),
    ),
    TaskSpec(
        name="shift",
        description="replace each letter of a word by the next one in the alphabet (z becomes a)",
        sample=_shift,
        phrasings=(
            "Shift each letter of {word} by one.",
            "shift: {word}",
            "Caesar-shift {word} by 1.",
            "Move every letter of {word} one step forward.",
            "Next letters of {word}?",
        ),
        heldout_phrasings=(
            "Replace each letter in '{word}' with the one after it.",
            "Encode {word} with a rotation of one.",
        ),
    ),
    TaskSpec(
        name="sort_digits",
        description="sort the digits of a number in ascending order",
        sample=_sort_digits,
        phrasings=(
            "Sort {digits}.",
            "sort: {digits}",
            "Sort the digits of {digits}.",
            "Order the digits {digits} from low to high.",
            "Arrange {digits} in ascending order.",
        ),
        heldout_phrasings=(
            "Put the digits of {digits} smallest first.",
            "What is {digits} with its digits sorted?",
        ),
    ),
    TaskSpec(
        name="max_digit",
        description="the largest digit of a number",
        sample=_max_digit,
        phrasings=(
            "Largest digit in {digits}?",
            "max: {digits}",
            "What is the biggest digit of {digits}?",
            "Find the maximum digit in {digits}.",
            "Which digit of {digits} is highest?",
        ),
        heldout_phrasings=(
            "Tell me the top digit among {digits}.",
            "{digits}: which digit is greatest?",
        ),
    ),
    TaskSpec(
        name="add",
        description="add a digit to a number below 100",
        sample=_add,
        phrasings=(
            "What is {a} + {b}?",
            "{a} + {b} =",
            "Add {a} and {b}.",
            "Sum of {a} and {b}?",
            "{a} plus {b}?",
        ),
        heldout_phrasings=(
            "If I have {a} apples and get {b} more, how many do I have?",
            "Total of {a} together with {b}, please.",
        ),
    ),
)

TASKS_BY_NAME: Mapping[str, TaskSpec] = MappingProxyType({task.name: task for task in TASKS})

SCORERS: Mapping[str, Scorer] = MappingProxyType({task.name: task.score for task in TASKS})


def scorer_for(name: str) -> Scorer:
    """The scorer of a demo task, or exact match for a task the demo does not define."""
    return SCORERS.get(name, exact_match)
