"""lm-evaluation-harness as a client of a real `taer serve` (the tiny pipeline, keep 50%, pruned):
a log-likelihood task through ``local-completions`` (token-id prompts, ``echo``, ``logprobs``) and a
generate-until task through ``local-completions`` and ``local-chat-completions``, both defined here
over local JSON files. Each sample's result equals what the transformers model computes directly
under the pattern retrieval picks for that request; so do the metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_server import tiny_pipeline, tiny_serve_spec

from benchmarks.servers import ServerProcess
from retrieval.service import RouteRequest
from server.loading import ServeConfig, load_engine_parts
from server.model_runner import BatchRunner

CHOICES = [
    {"question": "What is 3 plus 10? Add the two numbers.", "choices": ["13", "14", "31"], "answer": 0},
    {"question": "What is 5 plus 12? Add the two numbers.", "choices": ["71", "17", "16"], "answer": 1},
    {
        "question": "Reverse the letters of the word apple.",
        "choices": ["elppa", "apple", "lppae"],
        "answer": 0,
    },
    {
        "question": "Reverse the letters of the word stone.",
        "choices": ["stone", "notes", "enots"],
        "answer": 2,
    },
]
GENERATE = [
    {"question": "What is 3 plus 10? Add the two numbers.", "answer": "13"},
    {"question": "Reverse the letters of the word tiger.", "answer": "regit"},
    {"question": "What is 8 plus 15? Add the two numbers.", "answer": "23"},
]
MAX_GEN_TOKS = 8


def _task_files(root: Path) -> Path:
    """Two lm-eval tasks over local JSON files, in a directory for its TaskManager."""
    for name, docs in (("choice", CHOICES), ("generate", GENERATE)):
        (root / f"{name}.jsonl").write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    (root / "taer_choice.yaml").write_text(
        f"""task: taer_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / "choice.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""
    )
    (root / "taer_generate.yaml").write_text(
        f"""task: taer_generate
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / "generate.jsonl"}
test_split: test
output_type: generate_until
doc_to_text: "<user>{{{{question}}}}\\n<assistant>"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: {MAX_GEN_TOKS}
  do_sample: false
metric_list:
  - metric: exact_match
"""
    )
    return root


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm-eval")
    # Nothing from the network: the tasks read local files, the tokenizer is the store's. (Set
    # before lm-eval imports datasets, which reads it once.)
    with pytest.MonkeyPatch.context() as patch:
        for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            patch.setenv(name, "1")
        with ServerProcess(tiny_serve_spec("lm-eval"), root / "taer.log") as server:
            yield server.spec.base_url, _task_files(root)


@pytest.fixture(scope="module")
def reference():
    """The served engine's parts, in this process: its router retrieves as the server does."""
    store, patterns = tiny_pipeline()
    return load_engine_parts(ServeConfig(store, patterns, keep=0.5, slots_per_layer=8))


def _evaluate(model: str, url: str, tasks_dir: Path, task: str, **args) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    store, _ = tiny_pipeline()
    model_args = {"model": "ckpt", "base_url": url, "tokenizer": str(store), "max_length": 200, **args}
    return lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=[task],
        task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False),
        log_samples=True,
        apply_chat_template=model == "local-chat-completions",
    )


def _route(parts, text: str, ids: list[int]):
    """The route the server takes for prompt ``ids``: retrieval's pick for ``text``, then the router
    check on the prompt's prefill (with the pick's routing mask), as the engine runs it."""
    route = parts.router.route([RouteRequest(text)])[0]
    if not parts.router.checks(route):
        return route
    runtime, layout = parts.runtime, parts.runtime.layout
    runtime.activate_all()
    masks = {}
    for layer in layout.moe_layers:
        masks[layer] = torch.zeros(1, layout.num_experts, dtype=torch.bool)
        masks[layer][0, list(route.selection[layer])] = True
    runner = BatchRunner(runtime, [ids], masks, check_prompts=[0])
    runner.step()
    return parts.router.follow(route, parts.router.check.decide(route.task, runner.router_choices[0]))


def _logprobs(parts, ids: list[int]) -> torch.Tensor:
    """log_softmax of the model's logits at each position, under the pattern retrieval picks for the
    prompt's text (as the server retrieves for a token-id prompt), after the router check."""
    text = parts.tokenizer.decode(ids, skip_special_tokens=True)
    route = _route(parts, text, ids)
    parts.runtime.activate(route.selection, route.mode)
    with torch.inference_mode():
        logits = parts.runtime.model(torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def _greedy(parts, ids: list[int], retrieval_text: str) -> str:
    """The greedy answer under the pattern retrieval picks for ``retrieval_text`` (after the router
    check), cut at a newline."""
    route = _route(parts, retrieval_text, ids)
    parts.runtime.activate(route.selection, route.mode)
    prompt = torch.tensor([ids])
    out = parts.runtime.model.generate(
        prompt, max_new_tokens=MAX_GEN_TOKS, do_sample=False, eos_token_id=2, pad_token_id=0
    )
    text = parts.tokenizer.decode(out[0, prompt.shape[1] :].tolist(), skip_special_tokens=True)
    return text.split("\n")[0]


def test_log_likelihood_task_through_local_completions(served, reference):
    url, tasks_dir = served
    results = _evaluate("local-completions", f"{url}/v1/completions", tasks_dir, "taer_choice")
    samples = results["samples"]["taer_choice"]
    assert len(samples) == len(CHOICES)
    correct = 0
    tokenizer = reference.tokenizer
    for sample in samples:
        doc = sample["doc"]
        expected = []
        for (context, continuation), (served_logprob, _) in zip(
            sample["arguments"], [r[0] for r in sample["resps"]], strict=True
        ):
            context_ids = tokenizer.encode(context, add_special_tokens=False)
            ids = context_ids + tokenizer.encode(continuation, add_special_tokens=False)
            table = _logprobs(reference, ids)
            direct = sum(table[i - 1, ids[i]].item() for i in range(len(context_ids), len(ids)))
            assert served_logprob == pytest.approx(direct, abs=1e-3), (context, continuation)
            expected.append(direct)
        correct += int(max(range(len(expected)), key=expected.__getitem__) == doc["answer"])
    assert results["results"]["taer_choice"]["acc,none"] == pytest.approx(correct / len(CHOICES))
    print(f"taer_choice acc {correct}/{len(CHOICES)}")


@pytest.mark.parametrize("model", ["local-completions", "local-chat-completions"])
def test_generate_until_task_through_completions_and_chat(served, reference, model):
    url, tasks_dir = served
    path = "/v1/completions" if model == "local-completions" else "/v1/chat/completions"
    results = _evaluate(model, f"{url}{path}", tasks_dir, "taer_generate")
    samples = results["samples"]["taer_generate"]
    tokenizer = reference.tokenizer
    matches = 0
    for sample in samples:
        context = f"<user>{sample['doc']['question']}\n<assistant>"  # the task's doc_to_text
        if model == "local-completions":  # lm-eval sends the context's token ids
            ids = tokenizer.encode(context, add_special_tokens=False)
        else:
            prompt = tokenizer.apply_chat_template(
                [{"role": "user", "content": context}], add_generation_prompt=True, tokenize=False
            )
            ids = tokenizer.encode(prompt, add_special_tokens=False)
        direct = _greedy(reference, ids, context)
        assert sample["filtered_resps"][0] == direct, context
        matches += int(direct == sample["doc"]["answer"])
    assert results["results"]["taer_generate"]["exact_match,none"] == pytest.approx(matches / len(GENERATE))
    print(model, [s["filtered_resps"][0] for s in samples], f"exact match {matches}/{len(GENERATE)}")
