"""`taer discover`: clustering that recovers separated groups, the number of tasks, names, and a
tasks file that round-trips through the loader and `taer calibrate`; bad input writes nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pipeline import char_tokenizer
from sklearn.metrics import adjusted_rand_score
from tiny_models import save_tiny

from expert_store.errors import DiscoveryError
from expert_store.shard import shard_checkpoint
from retrieval.cluster_names import cluster_names
from retrieval.discover import NOISE, DiscoveryOptions, cluster_prompts
from retrieval.tasks_file import load_calibration_file, load_tasks_file
from server.cli import main


def _groups(sizes, spread=0.25, dim=64, seed=0, isolated=0):
    """Unit vectors around orthogonal centres, ``isolated`` lone ones orthogonal to every centre and
    to each other, and their labels (:data:`NOISE` for the lone ones)."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(dim, dim)))[0]
    vectors, labels = [], []
    for label, (centre, size) in enumerate(zip(basis[: len(sizes)], sizes, strict=True)):
        vectors.append(centre + spread * rng.normal(size=(size, dim)) / np.sqrt(dim))
        labels += [label] * size
    vectors.append(basis[len(sizes) : len(sizes) + isolated])
    labels += [NOISE] * isolated
    vectors = np.concatenate(vectors)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True), np.array(labels)


def test_separated_groups_are_recovered_and_lone_points_go_to_general():
    vectors, truth = _groups([40, 50, 60, 45], isolated=8)
    found = cluster_prompts(vectors)
    assert found.chosen_by == "min_size" and len(found.clusters) == 4
    assert adjusted_rand_score(truth, found.labels) == 1.0
    assert set(found.noise) == set(np.flatnonzero(truth == NOISE))
    assert [c.size for c in found.clusters] == [60, 50, 45, 40]  # largest first
    for cluster in found.clusters:
        assert cluster.silhouette > 0.5 and cluster.margin > 0.5
        assert list(cluster.centrality) == sorted(cluster.centrality, reverse=True)
    assert found.silhouette_by_k[4] == pytest.approx(found.silhouette)
    assert max(found.silhouette_by_k, key=found.silhouette_by_k.get) == 4


def test_min_size_sets_how_finely_tasks_split_and_clusters_fixes_k():
    # Two tasks, each of two wordings of 20 prompts: the wordings are groups of their own, nearer
    # each other than the other task's.
    rng = np.random.default_rng(1)
    tasks = np.linalg.qr(rng.normal(size=(32, 32)))[0][:2]
    wordings = np.repeat(tasks, 2, axis=0) + 0.45 * np.linalg.qr(rng.normal(size=(32, 32)))[0][2:6]
    vectors = np.repeat(wordings, 20, axis=0) + 0.02 * rng.normal(size=(80, 32))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    task_of, wording_of = np.repeat([0, 1], 40), np.repeat([0, 1, 2, 3], 20)
    assert adjusted_rand_score(task_of, cluster_prompts(vectors).labels) == 1.0  # min size 32
    assert (
        adjusted_rand_score(wording_of, cluster_prompts(vectors, DiscoveryOptions(min_size=16)).labels) == 1.0
    )
    fixed = cluster_prompts(vectors, DiscoveryOptions(num_clusters=3))
    assert fixed.chosen_by == "fixed" and len(fixed.clusters) == 3
    assert len(cluster_prompts(vectors, DiscoveryOptions(num_clusters=1)).clusters) == 1


def test_a_large_log_is_clustered_on_a_sample_and_the_rest_assigned():
    vectors, truth = _groups([120, 150, 130], isolated=10, seed=2)
    found = cluster_prompts(vectors, DiscoveryOptions(max_fit=150))
    assert found.num_fitted == 150 and len(found.clusters) == 3
    assert adjusted_rand_score(truth, found.labels) == 1.0


def test_nothing_to_cluster_and_bad_options_are_errors():
    lone = np.eye(6, dtype=np.float32)
    with pytest.raises(DiscoveryError, match="no prompt has 4 others within cosine"):
        cluster_prompts(lone)
    with pytest.raises(DiscoveryError, match="--clusters must be at least 1"):
        DiscoveryOptions(num_clusters=0)
    with pytest.raises(DiscoveryError, match="--min-similarity"):
        DiscoveryOptions(min_similarity=2.0)


def test_names_come_from_shared_distinctive_words_and_are_unique():
    texts = [f"Reverse the word {w} backwards." for w in ("apple", "stone", "river", "cloud")]
    texts += [f"Sort the digits of {n}." for n in (312, 9021, 5521, 77)]
    texts += [f"Reverse the word {w} backwards." for w in ("tiger", "plant")]
    texts += ["general", "general", "Hello there."]
    clusters = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [10, 11], [12]]
    assert cluster_names(texts, clusters) == [
        "backwards_reverse",
        "digits_sort",
        "backwards_reverse_2",
        "general_2",  # `general` is reserved
        "hello",
    ]


# ----- the command, end to end with the real encoder ------------------------------------------------

_KINDS = {
    "translate": lambda i, w: f"Translate the word '{w}' into French.",
    "arithmetic": lambda i, w: f"What is {7 * i + 13} multiplied by {i + 12}?",
    "poem": lambda i, w: f"Write a short poem about a {w}.",
}
_WORDS = [
    f"{colour} {thing}"
    for colour in ("red", "blue", "green", "old", "tiny")
    for thing in ("apple", "river", "stone", "tiger", "piano", "castle")
]
_UNRELATED = ("hello", "What year did the Berlin wall fall?", "How do I install numpy?")


def _log(tmp_path) -> tuple[object, dict[str, str]]:
    truth = {kind(i, w): name for name, kind in _KINDS.items() for i, w in enumerate(_WORDS)}
    lines = [{"model": "m", "messages": [{"role": "user", "content": text}]} for text in truth]
    lines += [{"model": "m", "prompt": text} for text in _UNRELATED]
    np.random.default_rng(0).shuffle(lines)
    path = tmp_path / "requests.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path, truth


def _tiny_store(root):
    save_tiny("qwen3_moe", root / "ckpt")
    char_tokenizer().save_pretrained(root / "ckpt")
    shard_checkpoint(root / "ckpt", root / "store")
    return root / "store"


def test_discover_writes_a_tasks_file_that_calibrate_takes(tmp_path, capsys):
    log, truth = _log(tmp_path)
    out = tmp_path / "found" / "tasks.yaml"
    assert main(["discover", str(log), "--out", str(out), "--min-size", "16", "--held-out", "0.25"]) == 0
    printed = capsys.readouterr().out
    assert "3 tasks" in printed and "3 prompts fit no task" in printed

    specs = load_tasks_file(out)
    assert len(specs) == 3
    for spec in specs:
        heldout = load_calibration_file(spec.heldout_path)
        texts = [p.query_text for p in spec.calibration + heldout]
        assert len({truth[t] for t in texts}) == 1 and len(texts) == len(_WORDS)  # one whole kind each
        assert len(heldout) == round(0.25 * len(_WORDS)) and not set(spec.calibration) & set(heldout)
        assert spec.calibration[0].messages is not None  # chat requests stay chat prompts
    names = {spec.name: truth[spec.calibration[0].query_text] for spec in specs}
    assert set(names.values()) == set(_KINDS)
    words = {"translate": {"translate", "french"}, "arithmetic": {"multiplied"}, "poem": {"poem", "short"}}
    assert all(words[kind] & set(name.split("_")) for name, kind in names.items()), names
    general = load_calibration_file(out.parent / "tasks_prompts" / "general.jsonl")
    assert sorted(p.prompt for p in general) == sorted(_UNRELATED)
    summary = json.loads((out.parent / "tasks_prompts" / "discovery.json").read_text())
    assert [t["size"] for t in summary["tasks"]] == [len(_WORDS)] * 3

    store = _tiny_store(tmp_path)
    assert (
        main(["calibrate", str(store), str(out), "--out", str(tmp_path / "patterns"), "--batch-size", "16"])
        == 0
    )
    assert set(json.loads((tmp_path / "patterns" / "patterns.json").read_text())["tasks"]) >= set(names)

    # A second run replaces the first's files; --clusters fixes the number of tasks.
    assert main(["discover", str(log), "--out", str(out), "--clusters", "2", "--min-size", "16"]) == 0
    assert len(load_tasks_file(out)) == 2
    assert len(list((out.parent / "tasks_prompts" / "calibration").iterdir())) == 2


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "not found"),
        ("\n\n", "the log is empty"),
        ('{"prompt": "a"}\n{"prompt": "b"\n', "requests.jsonl:2: not JSON"),
        ('{"prompt": "a"}\n{"model": "m"}\n', "requests.jsonl:2: a request body needs 'messages'"),
    ],
)
def test_bad_input_is_an_error_naming_it_and_writes_nothing(tmp_path, capsys, content, message):
    log = tmp_path / "requests.jsonl"
    if content is not None:
        log.write_text(content)
    out = tmp_path / "found" / "tasks.yaml"
    assert main(["discover", str(log), "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "found").exists()


def test_a_directory_not_written_by_discover_is_not_replaced(tmp_path, capsys):
    log, _ = _log(tmp_path)
    (tmp_path / "tasks_prompts").mkdir()
    (tmp_path / "tasks_prompts" / "mine.txt").write_text("keep me")
    assert main(["discover", str(log), "--out", str(tmp_path / "tasks.yaml")]) == 2
    assert "was not written by `taer discover`" in capsys.readouterr().err
    assert (tmp_path / "tasks_prompts" / "mine.txt").read_text() == "keep me"
    assert not (tmp_path / "tasks.yaml").exists()
    assert main(["discover", str(log), "--out", str(tmp_path / "tasks.txt")]) == 2
    assert "give a .yaml path" in capsys.readouterr().err
