"""TCESS against hand computations, a naive reference, and the DeepSeek-V3 router's own choice."""

from __future__ import annotations

import math

import pytest
import torch

from expert_store.errors import PatternError
from retrieval.tcess import SuperExpertTracker, TaskStatsAccumulator, pool


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# Three tokens, four experts, top_k = Ka = 2. Over A (the two best logits) softmax p of the better
# one is sigmoid(gap):
#   t1 [ 2.0,  1.0, -1.0,  0.0]  A = {0, 1}  gap 1.0  p_max = 0.7310586
#   t2 [-0.5, -3.0, -2.5, -2.0]  A = {0, 3}  gap 1.5  p_max = 0.8175745
#   t3 [-3.0, -1.0, -4.0, -0.8]  A = {3, 1}  gap 0.2  p_max = 0.5498340
# r = mean p_max = 2.0984671 / 3 = 0.6994890: t1 and t2 keep their best expert (0), t3 keeps none.
# s~ = f(s) = max(s, sigmoid(s)): t1 -> f(2.0) = 2.0; t2 -> f(-0.5) = sigmoid(-0.5) = 0.3775407.
# TCESS_0 = (2.0 + 0.3775407) / 3 = 0.7925136, the others 0.
HAND_LOGITS = torch.tensor(
    [
        [2.0, 1.0, -1.0, 0.0],
        [-0.5, -3.0, -2.5, -2.0],
        [-3.0, -1.0, -4.0, -0.8],
    ]
)


def test_hand_computed_softmax_tcess():
    acc = TaskStatsAccumulator(num_layers=1, num_experts=4, top_k=2)
    acc.add(0, HAND_LOGITS)
    stats = acc.finalize()

    assert stats.num_tokens == 3 and stats.ka == 2 and stats.threshold_mode == "mean_max_prob"
    assert stats.thresholds[0].item() == pytest.approx(0.6994890, abs=1e-6)
    torch.testing.assert_close(stats.tcess[0], torch.tensor([0.7925136, 0.0, 0.0, 0.0]), atol=1e-6, rtol=0)
    # top-2 sets: {0, 1}, {0, 3}, {3, 1}
    torch.testing.assert_close(stats.frequency[0], torch.tensor([2 / 3, 2 / 3, 0.0, 2 / 3]))
    torch.testing.assert_close(stats.mean_prob[0], HAND_LOGITS.softmax(-1).mean(0))


def test_fixed_threshold_keeps_a_negative_logit():
    # r = 0.5 also keeps t3's best expert (3, p = 0.5498340): f(-0.8) = sigmoid(-0.8) = 0.3100255.
    acc = TaskStatsAccumulator(num_layers=1, num_experts=4, top_k=2)
    acc.add(0, HAND_LOGITS)
    stats = acc.finalize(threshold=0.5)

    assert stats.threshold_mode == "fixed" and stats.thresholds[0].item() == 0.5
    expected = torch.tensor([(2.0 + 0.3775407) / 3, 0.0, 0.0, 0.3100255 / 3])
    torch.testing.assert_close(stats.tcess[0], expected, atol=1e-6, rtol=0)
    assert (stats.tcess[0] >= 0).all(), "f keeps a selected negative logit above an unselected expert's 0"


def test_hand_computed_sigmoid_bias_tcess():
    # One token. sigmoid(logits) = [0.5, 0.7310586, 0.2689414, 0.8807971]; + bias [0.5, 0, 0.9, -0.2]
    # = [1.0, 0.7310586, 1.1689414, 0.6807971]. The bias changes the pick: A = {2, 0} (without it, {3, 1}).
    # p over A = softmax([1.1689414, 1.0]): p_2 = sigmoid(0.1689414) = 0.5421348 = r (one token), kept:
    # f(1.1689414) = 1.1689414 (> its sigmoid).
    logits = torch.tensor([[0.0, 1.0, -1.0, 2.0]])
    bias = torch.tensor([[0.5, 0.0, 0.9, -0.2]])
    acc = TaskStatsAccumulator(num_layers=1, num_experts=4, top_k=2, scoring="sigmoid_bias", bias=bias)
    acc.add(0, logits)
    stats = acc.finalize()

    assert stats.thresholds[0].item() == pytest.approx(0.5421348, abs=1e-6)
    torch.testing.assert_close(stats.tcess[0], torch.tensor([0.0, 0.0, 1.1689414, 0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(stats.frequency[0], torch.tensor([1.0, 0.0, 1.0, 0.0]))
    sig = torch.tensor([0.5, 0.7310586, 0.2689414, 0.8807971])
    torch.testing.assert_close(stats.mean_prob[0], sig / sig.sum(), atol=1e-6, rtol=0)


def reference_tcess(logits: torch.Tensor, ka: int, scoring: str, bias: torch.Tensor | None) -> torch.Tensor:
    """The definition, one token at a time, in float64: a check independent of the vectorised code."""
    rows = logits.double()
    if scoring == "sigmoid_bias":
        rows = rows.sigmoid() + bias.double()
    candidates = []
    for row in rows:
        top = sorted(range(len(row)), key=lambda e: -row[e].item())[:ka]
        exps = [math.exp(row[e].item()) for e in top]
        candidates.append([(e, row[e].item(), x / sum(exps)) for e, x in zip(top, exps, strict=True)])
    r = sum(max(p for _, _, p in cand) for cand in candidates) / len(candidates)
    tcess = torch.zeros(logits.shape[1], dtype=torch.float64)
    for cand in candidates:
        for e, s, p in cand:
            if p >= r:
                tcess[e] += max(s, sigmoid(s))
    return tcess / len(candidates)


@pytest.mark.parametrize(("scoring", "ka"), [("softmax", 2), ("softmax", 4), ("sigmoid_bias", 3)])
def test_matches_reference_on_random_logits(scoring, ka):
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(2, 40, 12, generator=gen) * 2  # [L, T, E]
    bias = torch.randn(2, 12, generator=gen) * 0.3 if scoring == "sigmoid_bias" else None
    acc = TaskStatsAccumulator(2, 12, top_k=2, ka=ka, scoring=scoring, bias=bias)
    for layer in range(2):
        acc.add(layer, logits[layer])
    stats = acc.finalize()
    for layer in range(2):
        expected = reference_tcess(logits[layer], ka, scoring, None if bias is None else bias[layer])
        torch.testing.assert_close(stats.tcess[layer].double(), expected, atol=1e-6, rtol=0)
    assert stats.tcess.dtype == torch.float32 and stats.tcess.shape == (2, 12)


def test_frequency_matches_deepseek_v3_group_limited_router():
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    config = DeepseekV3Config(
        hidden_size=8, n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4
    )
    router = DeepseekV3TopkRouter(config)
    torch.manual_seed(0)
    with torch.no_grad():
        router.weight.normal_()
        router.e_score_correction_bias.normal_(std=0.3)
        logits, _, chosen = router(torch.randn(64, 8))
    acc = TaskStatsAccumulator(
        1,
        16,
        top_k=4,
        scoring="sigmoid_bias",
        bias=router.e_score_correction_bias[None],
        num_groups=4,
        topk_groups=2,
    )
    acc.add(0, logits)
    stats = acc.finalize()
    torch.testing.assert_close(stats.frequency[0], torch.bincount(chosen.flatten(), minlength=16) / 64)
    # Ka = top_k: every expert TCESS credits is one the model routed to.
    assert set(torch.nonzero(stats.tcess[0]).flatten().tolist()) <= set(chosen.flatten().tolist())


def feed(acc: TaskStatsAccumulator, logits: torch.Tensor, chunk: int) -> None:
    for start in range(0, logits.shape[1], chunk):
        for layer in range(logits.shape[0]):
            acc.add(layer, logits[layer, start : start + chunk])


def test_chunks_equal_one_batch():
    logits = torch.randn(3, 101, 8, generator=torch.Generator().manual_seed(1))  # [L, T, E]
    whole, chunked = TaskStatsAccumulator(3, 8, 2, ka=3), TaskStatsAccumulator(3, 8, 2, ka=3)
    feed(whole, logits, chunk=101)
    feed(chunked, logits, chunk=13)
    a, b = whole.finalize(), chunked.finalize()
    assert torch.equal(a.tcess, b.tcess) and torch.equal(a.thresholds, b.thresholds)
    assert torch.equal(a.frequency, b.frequency)
    torch.testing.assert_close(a.mean_prob, b.mean_prob, atol=1e-7, rtol=0)
    assert a.num_tokens == b.num_tokens == 101
    assert chunked.nbytes == 3 * 101 * 3 * (4 + 2), "per token: Ka float32 scores + Ka int16 ids"


def test_general_pools_tokens_not_averages():
    gen = torch.Generator().manual_seed(3)
    math_logits = torch.randn(2, 30, 6, generator=gen) * 3  # peaked task, few tokens
    code_logits = torch.randn(2, 90, 6, generator=gen) * 0.5  # flat task, many tokens
    math_acc, code_acc, union = (TaskStatsAccumulator(2, 6, 2) for _ in range(3))
    feed(math_acc, math_logits, chunk=7)
    feed(code_acc, code_logits, chunk=50)
    feed(union, torch.cat([math_logits, code_logits], dim=1), chunk=120)
    before = math_acc.finalize()

    general = pool([math_acc, code_acc]).finalize()
    expected = union.finalize()
    assert general.num_tokens == 120
    torch.testing.assert_close(general.tcess, expected.tcess, atol=1e-7, rtol=0)
    torch.testing.assert_close(general.thresholds, expected.thresholds)
    torch.testing.assert_close(general.frequency, expected.frequency)
    torch.testing.assert_close(general.mean_prob, expected.mean_prob)
    average = (before.tcess + code_acc.finalize().tcess) / 2
    assert not torch.allclose(general.tcess, average, atol=1e-3), "pooling is not an average of averages"
    assert torch.equal(math_acc.finalize().tcess, before.tcess), "pooling must not change a task's stats"


def test_pool_refuses_different_settings():
    with pytest.raises(ValueError, match="different settings"):
        pool([TaskStatsAccumulator(1, 4, 2), TaskStatsAccumulator(1, 4, 2, ka=3)])


def test_refuses_bad_input():
    acc = TaskStatsAccumulator(2, 4, 2)
    with pytest.raises(PatternError, match="no calibration tokens"):
        acc.finalize()
    acc.add(0, HAND_LOGITS)
    with pytest.raises(PatternError, match="layer 0: 3, layer 1: 0"):
        acc.finalize()
    with pytest.raises(PatternError, match="non-finite"):
        acc.add(1, torch.tensor([[0.0, float("nan"), 1.0, 2.0]]))
    acc.add(1, HAND_LOGITS)
    with pytest.raises(PatternError, match=r"in \[0, 1\]"):
        acc.finalize(threshold=1.5)
    with pytest.raises(ValueError, match="top_k=5"):
        TaskStatsAccumulator(1, 4, 5)
    with pytest.raises(ValueError, match="bias"):
        TaskStatsAccumulator(1, 4, 2, bias=torch.zeros(1, 4))


def test_super_experts():
    tracker = SuperExpertTracker(num_layers=2, num_experts=5)
    tracker.update(0, torch.tensor([1.0, 2.0, 1.5, float("nan"), 1.0]))
    tracker.update(0, torch.tensor([-30.0, 0.5]), expert_ids=[3, 1])  # |-30| counts, 0.5 < 2.0 does not
    tracker.update(1, torch.tensor([1.0, 1.0, 1.0, 1.0, 10.0]))
    torch.testing.assert_close(tracker.max_abs[0], torch.tensor([1.0, 2.0, 1.5, 30.0, 1.0]))

    found = tracker.super_experts()  # layer 0 median 1.5: 30 > 15; layer 1 median 1: 10 is not > 10
    assert [(s.layer, s.expert) for s in found] == [(0, 3)]
    assert found[0].max_abs == 30.0 and found[0].layer_median == 1.5
    assert [(s.layer, s.expert) for s in tracker.super_experts(factor=5)] == [(0, 3), (1, 4)]
    assert SuperExpertTracker(1, 4).super_experts() == [], "nothing seen, nothing super"


@pytest.mark.gpu
def test_cuda_logits_give_the_cpu_stats():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 64, 16, generator=gen)  # [L, T, E]
    bias = torch.randn(2, 16, generator=gen) * 0.2
    results = []
    for device in ("cpu", "cuda"):
        acc = TaskStatsAccumulator(2, 16, 4, scoring="sigmoid_bias", bias=bias, num_groups=4, topk_groups=2)
        feed(acc, logits.to(device), chunk=20)
        results.append(acc.finalize())
    cpu, cuda = results
    for table in ("tcess", "frequency", "mean_prob", "thresholds"):
        torch.testing.assert_close(getattr(cuda, table), getattr(cpu, table), atol=1e-6, rtol=0)
