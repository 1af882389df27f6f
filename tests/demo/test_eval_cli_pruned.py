"""`taer eval` on a store, full and pruned, and the evaluator under selections and retrieval."""

from __future__ import annotations

import json

import pytest
from labelled_pipeline import build_labelled_pipeline

from demo.suite import load_suite
from evaluation.pruned_eval import SelectionEvaluator, SelectionPolicy, selection_for
from expert_store.runtime import load_runtime
from retrieval.calibrate import load_patterns_for_store
from retrieval.selection import Budget, random_selection
from retrieval.service import to_layers
from server.cli import main


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return build_labelled_pipeline(tmp_path_factory.mktemp("eval_pruned"))


def _eval(capsys, *args: str) -> dict:
    assert main(["eval", *map(str, args), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_store_evaluates_like_its_checkpoint(pipeline, capsys):
    store, _, tasks = pipeline
    from_store = _eval(capsys, store, "--tasks", tasks)
    from_checkpoint = _eval(capsys, store.parent / "ckpt", "--tasks", tasks)
    assert from_store == from_checkpoint
    # The labels are the full model's own answers: it scores whenever it stops by itself.
    assert from_store["mean"] > 0 and set(from_store) == {"tasks", "mean"}


def test_keeping_every_expert_reproduces_the_full_model(pipeline, capsys):
    store, patterns, tasks = pipeline
    full = _eval(capsys, store, "--tasks", tasks)
    pruned = _eval(capsys, store, "--tasks", tasks, "--patterns", patterns, "--keep", "1.0")
    assert pruned["tasks"] == full["tasks"] and pruned["mean"] == full["mean"]
    assert pruned["selection"]["keep"] == 1.0 and pruned["split"] == "eval"
    # Exact mode routes as the model does, whatever the slot budget: the full model's answers again.
    exact = _eval(
        capsys, store, "--tasks", tasks, "--patterns", patterns, "--experts-per-layer", "2", "--mode", "exact"
    )
    assert exact["tasks"] == full["tasks"]


def test_pruned_tasks_run_under_their_own_or_the_chosen_selection(pipeline):
    store, patterns_dir, tasks = pipeline
    patterns = load_patterns_for_store(patterns_dir, store)
    runtime = load_runtime(store)
    activated = []
    original = runtime.activate
    runtime.activate = lambda selection, mode="pruned": (
        activated.append((selection, mode)) or original(selection, mode)
    )
    evaluator = SelectionEvaluator(runtime, patterns, load_suite(tasks), limit=3, batch_size=4)
    layers = runtime.layout.moe_layers
    budget = Budget(keep=0.25)

    result = evaluator.under(SelectionPolicy(budget))
    assert [s for s, _ in activated] == [
        to_layers(patterns.select(t, budget), layers) for t in evaluator.names
    ]
    assert {mode for _, mode in activated} == {"pruned"} and result.tasks["reverse"].n == 3

    activated.clear()
    evaluator.under(SelectionPolicy(budget, task="reverse", scorer="frequency"))
    reverse = to_layers(patterns.select("reverse", budget, score="frequency"), layers)
    assert [s for s, _ in activated] == [reverse] * len(evaluator.names)

    activated.clear()
    evaluator.under(SelectionPolicy(budget, random_seed=7))
    stats = patterns.general.stats
    floor = random_selection(
        len(layers), stats.tcess.shape[1], budget, 7, stats.top_k, patterns.required_experts()
    )
    assert [s for s, _ in activated] == [to_layers(floor, layers)] * len(evaluator.names)

    # The same retained sets are evaluated once: the oracle again costs no activation.
    activated.clear()
    again = evaluator.under(SelectionPolicy(budget))
    assert activated == [] and again == result


def test_retrieval_serves_each_prompt_with_the_retrieved_pattern(pipeline):
    store, patterns_dir, tasks = pipeline
    patterns = load_patterns_for_store(patterns_dir, store)
    runtime = load_runtime(store)
    activated = []
    original = runtime.activate
    runtime.activate = lambda selection, mode="pruned": (
        activated.append(selection) or original(selection, mode)
    )
    evaluator = SelectionEvaluator(
        runtime, patterns, load_suite(tasks), split="heldout", limit=4, batch_size=4
    )
    policy = SelectionPolicy(Budget(keep=0.25))

    # A retriever that swaps the tasks for the first two prompts of each and is right for the rest.
    swap = {"arithmetic": "reverse", "reverse": "arithmetic"}
    picks = [swap[name] if i < 2 else name for name in evaluator.names for i in range(4)]
    result = evaluator.retrieved(policy, lambda texts: picks[: len(texts)])
    assert result.retrieval_accuracy == 0.5
    assert result.retrieved == {name: {name: 2, swap[name]: 2} for name in evaluator.names}
    own = {name: to_layers(selection_for(patterns, policy, name), runtime.layout.moe_layers) for name in swap}
    assert activated == [own["reverse"], own["arithmetic"], own["arithmetic"], own["reverse"]]
    assert all(score.n == 4 for score in result.result.tasks.values())
    document = result.to_json()
    assert document["retrieval_accuracy"] == 0.5 and document["tasks"]["reverse"]["retrieval_accuracy"] == 0.5


@pytest.mark.parametrize("matcher", ["semantic", "router"])
def test_eval_retrieve_end_to_end(pipeline, capsys, matcher):
    store, patterns, tasks = pipeline
    args = [store, "--tasks", tasks, "--patterns", patterns, "--keep", "0.25"]
    oracle = _eval(capsys, *args, "--split", "heldout")
    retrieved = _eval(capsys, *args, "--retrieve", "--matcher", matcher)
    assert retrieved["split"] == "heldout" and retrieved["matcher"] == matcher
    assert retrieved["retrieval_accuracy"] == 1.0  # held-out wordings close to the calibration prompts
    # Perfect retrieval serves every prompt with its own pattern: the oracle's accuracy exactly.
    assert {n: t["accuracy"] for n, t in retrieved["tasks"].items()} == {
        n: t["accuracy"] for n, t in oracle["tasks"].items()
    }
    if matcher == "router":
        assert (patterns / "router_matcher" / "signatures.json").is_file()


def test_pruned_table_output(pipeline, capsys):
    store, patterns, tasks = pipeline
    args = ["eval", str(store), "--tasks", str(tasks), "--patterns", str(patterns), "--keep", "0.5"]
    assert main([*args, "--retrieve", "--limit", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("# keep=0.5") and lines[1].split() == ["task", "accuracy", "n", "retrieved"]
    assert lines[-1].startswith("mean") and lines[-1].endswith("100.0%")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--keep", "0.5"], "need(s) --patterns"),
        (["--patterns", "{patterns}"], "needs a budget"),
        (["--patterns", "{patterns}", "--keep", "0.5", "--retrieve", "--task", "reverse"], "--retrieve"),
        (["--patterns", "{patterns}", "--keep", "0.1"], "fewer than the model's top-k"),
        (["--patterns", "{patterns}", "--keep", "0.5", "--task", "nope"], "no pattern for task"),
    ],
)
def test_pruned_eval_errors_are_one_line(pipeline, capsys, extra, message):
    store, patterns, tasks = pipeline
    extra = [arg.format(patterns=patterns) for arg in extra]
    assert main(["eval", str(store), "--tasks", str(tasks), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_patterns_need_a_store(pipeline, capsys):
    store, patterns, tasks = pipeline
    args = ["eval", str(store.parent / "ckpt"), "--tasks", str(tasks), "--patterns", str(patterns)]
    assert main([*args, "--keep", "0.5"]) == 2
    assert "not a taer store" in capsys.readouterr().err


def test_tasks_file_defaults_to_the_one_beside_the_store(pipeline, capsys):
    store, patterns, _ = pipeline
    # The pipeline's own tasks file has calibration prompts only: no labelled eval prompts.
    assert main(["eval", str(store), "--patterns", str(patterns), "--keep", "0.5"]) == 2
    assert "no task in the suite has labelled eval prompts" in capsys.readouterr().err
