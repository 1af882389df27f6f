"""The router check's part of `taer bench retrieval`: what the prompt's own routing adds to semantic
retrieval, per budget (the check compares retained sets, so its outcome depends on the budget).

For every labelled prompt of each split, the semantic pick is served as the engine serves it: the
prompt is prefilled with the pick's pattern as its routing mask, its own router choices are counted
in that prefill, and the check decides (``retrieval/router_check.py``). Picks of the fallback
(``general``) are not checked, as in the engine. Measured:

- top-1 before and after the check (after: the pattern that serves the prompt; a prompt sent to
  exact mode counts as neither right nor wrong, its share is given apart);
- of the wrong retrievals, the share caught (re-routed to the right task) and sent to exact mode;
  of the right ones, the share wrongly moved (re-routed or sent to exact mode);
- the router alone (the best-covering task) as a matcher, for comparison;
- out-of-domain requests: served by the fallback before, and by the fallback or exact mode after;
- the latency the check adds to a request: its prefill with and without the choice counter
  (interleaved, one prompt at a time), plus the decision, against the prefill alone.

Each prompt's final pick (a task, or :data:`EXACT`) feeds the end-to-end accuracy. Where the
model's routing fails the check's validation (``on_when_serving``), a server leaves the check off:
its effect is still measured, but the end-to-end picks are then the semantic ones.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from evaluation.pruned_eval import EXACT
from expert_store.runtime import MoERuntime
from retrieval.patterns import PatternSet
from retrieval.router_check import RouterProfile, Verdict
from retrieval.selection import Budget
from retrieval.service import PatternRouter
from retrieval.vote import FALLBACK_TASK
from server.model_runner import BatchRunner

TARGET_ADDED_SHARE = 0.05  # latency the check may add, as a share of the prefill


def measure_router_check(
    runtime: MoERuntime,
    patterns: PatternSet,
    profile: RouterProfile,
    keeps: Sequence[float],
    splits: dict[str, tuple[list[str], list[str]]],
    picks: dict[str, str],
    out_of_domain: Sequence[str],
    batch_size: int = 32,
    latency_prompts: int = 20,
) -> dict:
    """Per keep: the check's thresholds, its effect on each split and on the out-of-domain requests,
    and each prompt's final pick (``final[split]``: query -> task or EXACT). ``splits``: name ->
    (queries, true tasks); ``picks``: query -> the semantic pick for every query here."""
    rows = []
    for keep in tqdm(keeps, desc="router check", unit="keep"):
        router = PatternRouter(patterns, Budget(keep=keep))
        check = router.enable_check(profile)
        router.check = check  # measured even where serving would leave it off (``separates``)
        row = {
            "keep": keep,
            "margin": check.thresholds.margin,
            "floors": dict(check.thresholds.floors),
            "validated_on": check.thresholds.validated_on,
            "router_accuracy": check.thresholds.router_accuracy,
            "validation_wrongly_rerouted": check.thresholds.wrongly_rerouted,
            "on_when_serving": check.thresholds.separates,
            "splits": {},
            "final": {},
        }
        for split, (queries, truth) in splits.items():
            chosen = [picks[q] for q in queries]
            verdicts = checked(runtime, router, queries, chosen, batch_size)
            final = [_final(pick, verdict) for pick, verdict in zip(chosen, verdicts, strict=True)]
            row["splits"][split] = _effect(truth, chosen, verdicts, final)
            served = final if check.thresholds.separates else chosen  # what a server would do
            row["final"][split] = dict(zip(queries, served, strict=True))
        ood = [picks[q] for q in out_of_domain]
        ood_verdicts = checked(runtime, router, list(out_of_domain), ood, batch_size)
        ood_final = [_final(pick, v) for pick, v in zip(ood, ood_verdicts, strict=True)]
        row["out_of_domain"] = {
            "n": len(ood),
            "fallback_before": statistics.fmean(p == FALLBACK_TASK for p in ood),
            "fallback_or_exact_after": statistics.fmean(f in (FALLBACK_TASK, EXACT) for f in ood_final),
        }
        queries = splits[next(iter(splits))][0][:latency_prompts]
        row["latency"] = _added_latency(runtime, router, queries, [picks[q] for q in queries])
        rows.append(row)
    return {"rows": rows, "target_added_share": TARGET_ADDED_SHARE}


def checked(
    runtime: MoERuntime, router: PatternRouter, queries: list[str], picks: list[str], batch_size: int
) -> list[Verdict | None]:
    """The router check's verdict on each query served with its pick (``None``: not checked, the
    fallback's pick), from a prefill with the pick's routing mask, as the engine runs it."""
    verdicts: list[Verdict | None] = [None] * len(queries)
    todo = [i for i, pick in enumerate(picks) if pick in router.check.tasks]
    runtime.activate_all()
    for start in range(0, len(todo), batch_size):
        rows = todo[start : start + batch_size]
        runner = _runner(runtime, router, [queries[i] for i in rows], [picks[i] for i in rows], check=True)
        runner.step()
        for row, i in enumerate(rows):
            verdicts[i] = router.check.decide(picks[i], runner.router_choices[row])
    return verdicts


def _runner(
    runtime: MoERuntime, router: PatternRouter, queries: list[str], picks: list[str], check: bool
) -> BatchRunner:
    prompts = [_prompt_ids(runtime.tokenizer, q) for q in queries]
    layout = runtime.layout
    masks = {}
    for layer in layout.moe_layers:
        rows = torch.zeros(len(picks), layout.num_experts, dtype=torch.bool)
        for row, pick in enumerate(picks):
            rows[row, list(router.selection(pick)[layer])] = True
        masks[layer] = rows.to(runtime.device)
    return BatchRunner(runtime, prompts, masks, check_prompts=range(len(prompts)) if check else ())


def _prompt_ids(tokenizer, query: str) -> list[int]:
    """The prompt as the chat API builds it."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": query}], add_generation_prompt=True, tokenize=False
    )
    return tokenizer.encode(text, add_special_tokens=False)


def _final(pick: str, verdict: Verdict | None) -> str:
    if verdict is None:
        return pick
    return EXACT if verdict.action == "exact" else verdict.task


def _effect(truth: list[str], picks: list[str], verdicts: list[Verdict | None], final: list[str]) -> dict:
    n = len(truth)
    wrong = [i for i in range(n) if verdicts[i] is not None and picks[i] != truth[i]]
    right = [i for i in range(n) if verdicts[i] is not None and picks[i] == truth[i]]
    looked = [i for i in range(n) if verdicts[i] is not None]

    def share(indices: list[int], condition) -> float | None:
        return statistics.fmean(condition(i) for i in indices) if indices else None

    return {
        "n": n,
        "checked": len(looked),
        "top1_before": statistics.fmean(p == t for p, t in zip(picks, truth, strict=True)),
        "top1_after": statistics.fmean(f == t for f, t in zip(final, truth, strict=True)),
        "exact_after": statistics.fmean(f == EXACT for f in final),
        "wrong_retrievals": len(wrong),
        "caught": share(wrong, lambda i: final[i] == truth[i]),
        "wrong_to_exact": share(wrong, lambda i: final[i] == EXACT),
        "right_retrievals": len(right),
        "wrongly_moved": share(right, lambda i: final[i] != truth[i]),
        "router_alone_top1": share(looked, lambda i: verdicts[i].checked == truth[i]),
    }


def _added_latency(runtime: MoERuntime, router: PatternRouter, queries: list[str], picks: list[str]) -> dict:
    """Median ms per request of the prefill alone, the prefill counting its choices, and the decision;
    one prompt at a time, the two prefills interleaved (after one warm-up each)."""
    runtime.activate_all()
    served = [(q, p) for q, p in zip(queries, picks, strict=True) if p in router.check.tasks]
    plain, counted, decide = [], [], []
    for round_ in range(2):
        for query, pick in served:
            for check, out in ((False, plain), (True, counted)):
                runner = _runner(runtime, router, [query], [pick], check)
                started = time.perf_counter()
                runner.step()
                if round_:
                    out.append(time.perf_counter() - started)
            if round_:
                started = time.perf_counter()
                router.check.decide(pick, runner.router_choices[0])
                decide.append(time.perf_counter() - started)
    if not plain:
        return {"n": 0}
    prefill, with_counter, decision = (1e3 * statistics.median(x) for x in (plain, counted, decide))
    counting = 1e3 * statistics.median(c - p for c, p in zip(counted, plain, strict=True))  # paired
    added = max(0.0, counting) + decision
    return {
        "n": len(plain),
        "prefill_ms": prefill,
        "prefill_counting_ms": with_counter,
        "counting_ms": counting,
        "decide_ms": decision,
        "added_ms": added,
        "added_share": added / prefill,
    }
