"""The demo's tasks: seeded problem generators, natural-language phrasings and exact-match scorers.

Each task draws problems whose answer is a pure function of the problem, so a prediction can be checked
exactly. Tasks use distinct operand alphabets where they can (letters, the letters a-e only, digits
with an operator) so that a small MoE has a reason to route them to different experts.

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
    word = _word(rng, 3, 7)
    return Instance((("word", word),), word[::-1])


def _upper(rng: random.Random) -> Instance:
    word = _word(rng, 3, 8)
    return Instance((("word", word),), word.upper())


def _sort_digits(rng: random.Random) -> Instance:
    digits = _word(rng, 4, 8, string.digits)
    return Instance((("digits", digits),), "".join(sorted(digits)))


def _count_letter(rng: random.Random) -> Instance:
    text = _word(rng, 4, 10, "abcde")
    letter = rng.choice("abcde")
    return Instance((("letter", letter), ("text", text)), str(text.count(letter)))


def _add(rng: random.Random) -> Instance:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return Instance((("a", str(a)), ("b", str(b))), str(a + b))


def _multiply(rng: random.Random) -> Instance:
    a, d = rng.randint(0, 99), rng.randint(2, 9)
    return Instance((("a", str(a)), ("d", str(d))), str(a * d))


TASKS: tuple[TaskSpec, ...] = (
    TaskSpec(
        name="reverse",
        description="reverse a lower-case word",
        sample=_reverse,
        phrasings=(
            "Reverse the word '{word}'.",
            "Write {word} backwards.",
            "What is '{word}' spelled in reverse?",
            "reverse: {word}",
            "Please reverse the letters of {word}.",
        ),
        heldout_phrasings=(
            "Spell {word} starting from its last letter.",
            "If you read '{word}' right to left, what do you get?",
        ),
    ),
    TaskSpec(
        name="upper",
        description="upper-case a word",
        sample=_upper,
        phrasings=(
            "Convert '{word}' to upper case.",
            "Write {word} in capital letters.",
            "uppercase: {word}",
            "What is {word} in all caps?",
            "Capitalize every letter of '{word}'.",
        ),
        heldout_phrasings=(
            "Print {word} using only uppercase characters.",
            "How would '{word}' look if typed with caps lock on?",
        ),
    ),
    TaskSpec(
        name="sort_digits",
        description="sort the digits of a number in ascending order",
        sample=_sort_digits,
        phrasings=(
            "Sort the digits {digits} in ascending order.",
            "Arrange the digits of {digits} from smallest to largest.",
            "sort: {digits}",
            "Put the digits in {digits} in increasing order.",
        ),
        heldout_phrasings=(
            "Order these digits low to high: {digits}",
            "What do the digits of {digits} look like once sorted?",
        ),
    ),
    TaskSpec(
        name="count_letter",
        description="count how often a letter occurs in a string",
        sample=_count_letter,
        phrasings=(
            "How many times does the letter '{letter}' appear in '{text}'?",
            "Count the {letter}'s in {text}.",
            "count {letter} in {text}",
            "In the string {text}, how many {letter} are there?",
        ),
        heldout_phrasings=(
            "Tell me the number of occurrences of {letter} within {text}.",
            "{text}: how often do you see {letter} there?",
        ),
    ),
    TaskSpec(
        name="add",
        description="add two numbers below 100",
        sample=_add,
        phrasings=(
            "What is {a} + {b}?",
            "Add {a} and {b}.",
            "{a} plus {b} equals?",
            "Compute the sum of {a} and {b}.",
        ),
        heldout_phrasings=(
            "If I have {a} apples and get {b} more, how many do I have?",
            "Tell me the total of {a} together with {b}.",
        ),
    ),
    TaskSpec(
        name="multiply",
        description="multiply a number below 100 by a digit",
        sample=_multiply,
        phrasings=(
            "What is {a} * {d}?",
            "Multiply {a} by {d}.",
            "{a} times {d} equals?",
            "Compute the product of {a} and {d}.",
        ),
        heldout_phrasings=(
            "How much are {d} lots of {a}?",
            "Give me {a} multiplied by {d}.",
        ),
    ),
)

TASKS_BY_NAME: Mapping[str, TaskSpec] = MappingProxyType({task.name: task for task in TASKS})

SCORERS: Mapping[str, Scorer] = MappingProxyType({task.name: task.score for task in TASKS})


def scorer_for(name: str) -> Scorer:
    """The scorer of a demo task, or exact match for a task the demo does not define."""
    return SCORERS.get(name, exact_match)
