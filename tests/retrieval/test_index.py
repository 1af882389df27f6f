"""The task index over the real MiniLM encoder: retrieval, fallback, thresholds, persistence."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from expert_store.errors import RetrievalIndexError
from retrieval.build import INDEX_SUBDIR
from retrieval.encoder import Encoder, EncoderFingerprint
from retrieval.index import IndexSettings, TaskIndex, build_task_index
from retrieval.index_io import FORMAT_VERSION, METADATA_FILE
from retrieval.task_texts import texts_by_task
from retrieval.tasks_file import load_tasks_file
from retrieval.vote import FALLBACK_TASK, Neighbour, VoteRule, close_call, vote

TASKS = {
    "arithmetic": [
        "What is 12 plus 7?",
        "Compute 45 minus 19.",
        "Add 3 and 8.",
        "What is 6 times 9?",
        "Calculate 100 divided by 4.",
        "Sum 27 and 15.",
    ],
    "reversal": [
        "Reverse the string 'hello'.",
        "Write 'banana' backwards.",
        "Reverse the letters of 'planet'.",
        "Spell 'orange' in reverse order.",
        "What is 'stone' reversed?",
        "Flip the characters of 'window'.",
    ],
    "translation": [
        "Translate 'good morning' into French.",
        "How do you say 'cat' in Spanish?",
        "Translate 'thank you' to German.",
        "What is 'house' in Italian?",
        "Give the French word for 'water'.",
        "Translate 'friend' into Portuguese.",
    ],
}
QUERIES = {
    "What's 81 plus 13?": "arithmetic",
    "Please reverse 'keyboard'.": "reversal",
    "How would I say 'dog' in French?": "translation",
}


class CountingEncoder:
    """Wraps the real encoder, recording what it is asked to embed."""

    def __init__(self, encoder: Encoder, fingerprint: EncoderFingerprint | None = None) -> None:
        self.inner = encoder
        self.fingerprint = fingerprint or encoder.fingerprint
        self.dim = encoder.dim
        self.calls: list[list[str]] = []

    def encode(self, texts: list[str]) -> np.ndarray:
        self.calls.append(list(texts))
        return self.inner.encode(texts)


@pytest.fixture(scope="module")
def encoder() -> Iterator[Encoder]:
    # On a small shared CPU one torch thread is several times faster than OpenMP threads that
    # contend with other processes; restore the setting for the tests that follow.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # float32: batch-against-single equalities below must not depend on this CPU's bfloat16.
    yield Encoder.load(dtype="float32")
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def index(encoder) -> TaskIndex:
    return build_task_index(encoder, TASKS)


def test_query_worded_like_a_task_retrieves_it(index):
    results = index.query(list(QUERIES))
    for (text, expected), result in zip(QUERIES.items(), results, strict=True):
        assert result.task == expected, text
        assert result.candidate == expected
        assert not result.is_fallback
        assert 0.5 <= result.confidence <= 1.0
        assert result.runner_up != expected
        assert result.confidence >= result.runner_up_confidence
        assert len(result.neighbours) == 8
        assert result.similarity == max(n.encoder_cosine for n in result.neighbours if n.task == expected)


def test_neighbours_point_at_stored_texts(index):
    (result,) = index.query(["What is 12 plus 7?"])
    nearest = result.neighbours[0]
    assert index.texts[nearest.text_id] == "What is 12 plus 7?"
    assert nearest.task == "arithmetic"
    assert nearest.similarity == pytest.approx(1.0, abs=1e-5)
    assert [n.similarity for n in result.neighbours] == sorted(
        (n.similarity for n in result.neighbours), reverse=True
    )


@pytest.mark.parametrize("text", ["", "   ", "\n\t "])
def test_empty_text_is_general_and_never_encoded(encoder, text):
    counting = CountingEncoder(encoder)
    index = build_task_index(counting, TASKS)
    counting.calls.clear()
    (result,) = index.query([text])
    assert result.task == FALLBACK_TASK
    assert result.confidence == 0.0
    assert result.candidate is None
    assert result.neighbours == ()
    assert counting.calls == []


def test_empty_texts_in_a_batch_are_skipped(encoder):
    counting = CountingEncoder(encoder)
    index = build_task_index(counting, TASKS)
    counting.calls.clear()
    results = index.query(["", "What is 5 plus 5?", " "])
    assert [r.task for r in results] == [FALLBACK_TASK, "arithmetic", FALLBACK_TASK]
    assert counting.calls == [["What is 5 plus 5?"]]


@pytest.fixture(scope="module")
def encoder_space_index(encoder) -> TaskIndex:
    """The vote on the encoder's own vectors, without the task space."""
    return build_task_index(encoder, TASKS, settings=IndexSettings(projection_shrinkage=None))


def test_high_confidence_threshold_forces_general(encoder_space_index):
    # Eight neighbours, six texts per task, all of positive cosine: no task can take the whole vote.
    (result,) = encoder_space_index.query(["What's 81 plus 13?"], min_confidence=1.0)
    assert result.task == FALLBACK_TASK
    assert result.is_fallback
    assert result.candidate == "arithmetic"
    assert result.confidence > 0.5


def test_high_similarity_threshold_forces_general(index):
    (result,) = index.query(["What's 81 plus 13?"], min_similarity=0.99)
    assert result.task == FALLBACK_TASK
    assert result.candidate == "arithmetic"


def test_threshold_from_the_index_rule(encoder):
    settings = IndexSettings(projection_shrinkage=None)
    strict = build_task_index(encoder, TASKS, rule=VoteRule(min_confidence=1.0), settings=settings)
    assert strict.query(["What's 81 plus 13?"])[0].task == FALLBACK_TASK
    assert strict.query(["What's 81 plus 13?"], min_confidence=0.5)[0].task == "arithmetic"


def test_batch_query_equals_single_queries(index):
    texts = [*QUERIES, "Turn 'lamp' around", "Say 'bread' in Spanish"]
    batch = index.query(texts)
    for text, together in zip(texts, batch, strict=True):
        (alone,) = index.query([text])
        assert (alone.task, alone.candidate, alone.runner_up) == (
            together.task,
            together.candidate,
            together.runner_up,
        )
        assert [n.text_id for n in alone.neighbours] == [n.text_id for n in together.neighbours]
        assert alone.confidence == pytest.approx(together.confidence, abs=1e-5)
        assert alone.similarity == pytest.approx(together.similarity, abs=1e-5)


def test_long_text_is_truncated_not_rejected(index):
    (result,) = index.query(["What is 40 plus 2? " + "and then add some more numbers " * 1000])
    assert result.candidate == "arithmetic"


def test_k_larger_than_the_index_returns_every_text(index):
    (result,) = index.query(["Add 3 and 8."], k=100)
    assert len(result.neighbours) == index.size == 18


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_save_load_round_trips_exactly(tmp_path, encoder, kind):
    built = build_task_index(encoder, TASKS, kind=kind, rule=VoteRule(min_confidence=0.6, close_margin=0.2))
    built.save(tmp_path / "idx")
    loaded = TaskIndex.load(tmp_path / "idx", encoder)
    assert loaded.kind == kind
    assert (loaded.tasks, loaded.texts, loaded.created, loaded.rule) == (
        built.tasks,
        built.texts,
        built.created,
        built.rule,
    )
    np.testing.assert_array_equal(loaded.labels, built.labels)
    texts = [*QUERIES, "The weather in Lisbon is sunny today.", ""]
    assert loaded.query(texts) == built.query(texts)


def test_hnsw_agrees_with_flat_on_a_small_index(encoder):
    flat = build_task_index(encoder, TASKS, kind="flat")
    hnsw = build_task_index(encoder, TASKS, kind="hnsw")
    texts = list(QUERIES)
    for a, b in zip(flat.query(texts), hnsw.query(texts), strict=True):
        assert [n.text_id for n in a.neighbours] == [n.text_id for n in b.neighbours]
        assert a.task == b.task


def test_auto_kind_switches_at_the_threshold(encoder):
    assert build_task_index(encoder, TASKS, kind="auto").kind == "flat"
    settings = IndexSettings(hnsw_threshold=18)
    assert build_task_index(encoder, TASKS, kind="auto", settings=settings).kind == "hnsw"


def test_mismatched_encoder_is_refused(tmp_path, encoder, index):
    index.save(tmp_path / "idx")
    other = EncoderFingerprint("other-model", encoder.dim, "0123456789abcdef")
    with pytest.raises(RetrievalIndexError) as caught:
        TaskIndex.load(tmp_path / "idx", CountingEncoder(encoder, fingerprint=other))
    message = str(caught.value)
    assert str(encoder.fingerprint) in message
    assert "other-model:384:0123456789abcdef" in message
    assert f"({encoder.name}: --encoder NAME_OR_DIR)" in message  # what to pass


def test_empty_index_is_refused_at_build(encoder):
    with pytest.raises(RetrievalIndexError, match="no tasks"):
        build_task_index(encoder, {})
    with pytest.raises(RetrievalIndexError, match="'arithmetic' has no example texts"):
        build_task_index(encoder, {"arithmetic": []})
    with pytest.raises(RetrievalIndexError, match="at least one vector"):
        TaskIndex.from_vectors(encoder, np.zeros((0, encoder.dim), np.float32), [], [])


def test_empty_text_is_refused_at_build(encoder):
    with pytest.raises(RetrievalIndexError, match="'reversal' has an empty text at position 1"):
        build_task_index(encoder, {"reversal": ["Reverse 'a'.", "  "]})


def test_empty_index_is_refused_at_load(tmp_path, encoder, index):
    directory = index.save(tmp_path / "idx")
    faiss.write_index(faiss.IndexFlatIP(encoder.dim), str(directory / "index.faiss"))
    metadata = json.loads((directory / METADATA_FILE).read_text())
    metadata.update(size=0, labels=[], texts=[])
    (directory / METADATA_FILE).write_text(json.dumps(metadata))
    with pytest.raises(RetrievalIndexError, match="holds no vectors"):
        TaskIndex.load(directory, encoder)


def test_missing_or_foreign_index_is_refused(tmp_path, encoder, index):
    with pytest.raises(RetrievalIndexError, match=r"index\.faiss is missing"):
        TaskIndex.load(tmp_path / "nothing", encoder)
    directory = index.save(tmp_path / "idx")
    metadata = json.loads((directory / METADATA_FILE).read_text())
    metadata["format_version"] = FORMAT_VERSION + 1
    (directory / METADATA_FILE).write_text(json.dumps(metadata))
    with pytest.raises(RetrievalIndexError, match="format version"):
        TaskIndex.load(directory, encoder)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"labels": [0] * 17 + [7]}, "inconsistent"),
        ({"texts": ["one"]}, "inconsistent"),
        ({"kind": "ivf"}, "inconsistent"),
        ({"encoder": "no-colons"}, "malformed metadata"),
        ({"rule": {"min_confidence": 3.0}}, "malformed metadata"),
    ],
)
def test_inconsistent_metadata_is_refused(tmp_path, encoder, index, change, message):
    directory = index.save(tmp_path / "idx")
    metadata = json.loads((directory / METADATA_FILE).read_text())
    metadata.update(change)
    (directory / METADATA_FILE).write_text(json.dumps(metadata))
    with pytest.raises(RetrievalIndexError, match=message):
        TaskIndex.load(directory, encoder)


def test_unrelated_text_falls_back_to_general(index):
    (result,) = index.query(["The weather in Lisbon is sunny today."])
    assert result.task == FALLBACK_TASK
    assert result.candidate in TASKS
    assert result.similarity < index.rule.min_similarity


def test_vectors_of_the_wrong_dimension_are_refused(encoder):
    with pytest.raises(RetrievalIndexError, match="do not fit encoder"):
        TaskIndex.from_vectors(encoder, np.ones((2, 8), np.float32), ["a", "b"], ["x", "y"])


# The vote alone, on hand-made neighbours -----------------------------------------------------------


def neighbours(*pairs: tuple[str, float]) -> tuple[Neighbour, ...]:
    return tuple(Neighbour(task, similarity, i) for i, (task, similarity) in enumerate(pairs))


def test_vote_weights_by_similarity_and_clamps_negatives():
    result = vote(neighbours(("a", 0.9), ("b", 0.6), ("b", 0.5), ("a", -0.4)), VoteRule(min_similarity=0.0))
    assert result.candidate == "b"  # 1.1 against 0.9
    assert result.confidence == pytest.approx(1.1 / 2.0)
    assert result.runner_up_confidence == pytest.approx(0.9 / 2.0)
    assert result.similarity == pytest.approx(0.6)
    assert result.task == "b"


def test_vote_tie_goes_to_the_nearest_and_is_a_close_call():
    result = vote(neighbours(("a", 0.5), ("b", 0.5)), VoteRule(min_confidence=0.5, min_similarity=0.0))
    assert result.task == "a"
    assert result.close_call
    assert close_call(result, margin=0.01)
    clear = vote(neighbours(("a", 0.9), ("a", 0.8), ("b", 0.1)), VoteRule(close_margin=0.1))
    assert not clear.close_call
    assert close_call(clear, margin=0.9)


def test_vote_with_no_positive_similarity_falls_back():
    result = vote(neighbours(("a", -0.1), ("b", -0.3)), VoteRule(min_confidence=0.0, min_similarity=-1.0))
    assert result.task == FALLBACK_TASK
    assert result.candidate == "a"
    assert result.confidence == 0.0


def test_vote_rule_rejects_out_of_range_thresholds():
    with pytest.raises(ValueError, match="min_confidence"):
        VoteRule(min_confidence=1.5)
    assert dataclasses.replace(VoteRule(), min_confidence=0.0).min_confidence == 0.0


# From a tasks file to an index on disk -------------------------------------------------------------


def write_tasks_file(directory: Path) -> Path:
    (directory / "arith.txt").write_text("What is 12 plus 7?\nCompute 45 minus 19.\nWhat is 12 plus 7?\n")
    lines = [
        {"prompt": "Reverse the string 'hello'."},
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "Write 'banana' backwards."},
            ]
        },
    ]
    (directory / "rev.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    tasks = "tasks:\n  arithmetic: arith.txt\n  reversal:\n    calibration: rev.jsonl\n    examples: [\"turn 'lamp' around\"]\n"
    (directory / "tasks.yaml").write_text(tasks)
    return directory / "tasks.yaml"


def test_texts_by_task_takes_query_texts_and_examples_once(tmp_path):
    specs = load_tasks_file(write_tasks_file(tmp_path))
    assert texts_by_task(specs) == {
        "arithmetic": ["What is 12 plus 7?", "Compute 45 minus 19."],
        "reversal": ["Reverse the string 'hello'.", "Write 'banana' backwards.", "turn 'lamp' around"],
    }


def test_taer_index_builds_a_loadable_index(tmp_path, encoder, capsys):
    from server.cli import main

    tasks_file = write_tasks_file(tmp_path)
    assert main(["index", str(tasks_file), str(tmp_path / "patterns"), "--min-confidence", "0.6"]) == 0
    assert "flat index, 5 texts, 2 tasks" in capsys.readouterr().out
    index = TaskIndex.load(tmp_path / "patterns" / INDEX_SUBDIR, encoder)  # where `taer serve` looks
    assert index.rule.min_confidence == 0.6
    assert [r.task for r in index.query(["Add 5 and 9.", "Spell 'river' backwards."])] == [
        "arithmetic",
        "reversal",
    ]
    assert main(["index", str(tasks_file), str(tmp_path / "patterns"), "--min-confidence", "2"]) == 2
    assert "min_confidence must lie in [0, 1]" in capsys.readouterr().err


def test_taer_index_encoder_by_name(tmp_path, encoder, capsys):
    from server.cli import main

    tasks_file = write_tasks_file(tmp_path)
    patterns = tmp_path / "patterns"
    assert main(["index", str(tasks_file), str(patterns), "--encoder", "minilm"]) == 0
    assert f"encoder {encoder.fingerprint}" in capsys.readouterr().out
    metadata = json.loads((patterns / INDEX_SUBDIR / METADATA_FILE).read_text())
    assert metadata["encoder"] == str(encoder.fingerprint)  # the index records its encoder
    assert main(["index", str(tasks_file), str(patterns), "--encoder", "no-such-model"]) == 2
    assert "encoder 'no-such-model': no such directory, nor a name taer knows" in capsys.readouterr().err


def test_taer_index_task_space_options(tmp_path, encoder, capsys):
    from server.cli import main

    tasks_file = write_tasks_file(tmp_path)
    patterns = tmp_path / "patterns"
    assert main(["index", str(tasks_file), str(patterns), "--shrinkage", "0.2"]) == 0
    assert "task space (shrinkage 0.2)" in capsys.readouterr().out
    assert TaskIndex.load(patterns / INDEX_SUBDIR, encoder).task_space.projection.shrinkage == 0.2
    assert main(["index", str(tasks_file), str(patterns), "--no-task-space"]) == 0
    assert "no task space" in capsys.readouterr().out
    assert TaskIndex.load(patterns / INDEX_SUBDIR, encoder).task_space is None
    assert main(["index", str(tasks_file), str(patterns), "--shrinkage", "1.5"]) == 2
    assert "--shrinkage must lie in [0, 1], got 1.5" in capsys.readouterr().err


_THREADS_SCRIPT = """
import torch  # first, as in `taer serve`: then FAISS's OpenMP runtime is torch's
import numpy as np
from retrieval.index import IndexSettings, TaskIndex

class Encoder:
    dim = 8
    fingerprint = None

torch.set_num_threads(2)
vectors = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
for kind in ("flat", "hnsw"):
    index = TaskIndex.from_vectors(
        Encoder(), vectors, [str(i % 4) for i in range(64)], [str(i) for i in range(64)], kind=kind,
        settings=IndexSettings(num_threads=1),
    )
    index.search(vectors[:3])
    assert torch.get_num_threads() == 2, (kind, torch.get_num_threads())
"""


def test_building_and_searching_leave_torchs_thread_count_alone():
    # FAISS and torch can share one OpenMP runtime, whose thread count belongs to the calling
    # thread: an index that left its own count set would change the thread count (so the last bits,
    # and sometimes a greedy token) of the model run after it on that thread. A fresh process, since
    # whether the runtime is shared depends on which of the two was imported first.
    subprocess.run([sys.executable, "-c", _THREADS_SCRIPT], check=True, timeout=120)
