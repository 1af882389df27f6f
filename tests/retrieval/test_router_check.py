"""The router check's parts: counting choices, fit and coverage, the decision rule, the thresholds
and validation derived from calibration prompts, and the profile that carries them through the
patterns directory."""

from __future__ import annotations

import pytest
import torch

from expert_store.errors import PatternError
from expert_store.routing import own_choices
from retrieval.router_check import (
    MAX_WRONGLY_REROUTED,
    PROFILE_FILE,
    RouterCheck,
    RouterProfile,
    Thresholds,
    count_choices,
    derive_thresholds,
)

# Two MoE layers (decoder layers 1 and 3) of four experts; task "a" keeps 0 and 1, "b" keeps 2 and 3.
SELECTIONS = {"a": {1: (0, 1), 3: (0, 1)}, "b": {1: (2, 3), 3: (2, 3)}}
LAYERS = (1, 3)


def _prompts(task_experts: list[int], count: int, seed: int, spread: float = 0.0) -> torch.Tensor:
    """``count`` prompts' choices [count, 2, 4]: mostly the experts ``task_experts``, a few others."""
    generator = torch.Generator().manual_seed(seed)
    choices = torch.randint(0, 2, (count, 2, 4), generator=generator, dtype=torch.int32)
    choices[:, :, task_experts] += torch.randint(
        4, 8, (count, 2, len(task_experts)), generator=generator, dtype=torch.int32
    )
    if spread:
        choices += (spread * torch.rand(count, 2, 4, generator=generator) * 8).to(torch.int32)
    return choices


def _profile(held_out: bool = False, confused: bool = False) -> RouterProfile:
    """Task a's prompts choose experts 0-1, b's 2-3. ``confused``: the held-out prompts route as the
    other task's (a model that follows wording, not task)."""
    choices = torch.cat([_prompts([0, 1], 20, 0), _prompts([2, 3], 20, 1)])
    labels = torch.tensor([0] * 20 + [1] * 20, dtype=torch.int32)
    if not held_out:
        return RouterProfile(("a", "b"), labels, choices)
    held = torch.cat([_prompts([0, 1], 10, 2), _prompts([2, 3], 10, 3)])
    held_labels = torch.tensor([1] * 10 + [0] * 10 if confused else [0] * 10 + [1] * 10, dtype=torch.int32)
    return RouterProfile(("a", "b"), labels, choices, held_labels, held)


def test_count_choices_counts_each_rows_tokens():
    ids = torch.tensor([[0, 1], [1, 2], [3, 0]])  # three tokens, top-2
    rows = torch.tensor([0, 0, 1])
    counts = count_choices(ids, rows, num_rows=3, num_experts=4)
    assert counts.tolist() == [[1, 2, 1, 0], [1, 0, 0, 1], [0, 0, 0, 0]]


def test_fit_prefers_the_task_whose_prompts_route_alike_and_coverage_is_the_retained_share():
    check = RouterCheck.calibrated(_profile(), SELECTIONS, LAYERS)
    like_a = torch.tensor([[[5, 4, 0, 1], [6, 3, 1, 0]]], dtype=torch.int32)
    fits = check.fit(like_a)[0]
    assert fits[0] > fits[1]
    assert check.coverage(like_a)[0].tolist() == pytest.approx([18 / 20, 2 / 20])
    empty = torch.zeros(1, 2, 4, dtype=torch.int32)  # no choices (an empty prompt): no division by zero
    assert check.fit(empty)[0].tolist() == [0.0, 0.0] and check.coverage(empty)[0].tolist() == [0.0, 0.0]


def test_decide_keeps_reroutes_or_falls_back_to_exact():
    check = RouterCheck.calibrated(_profile(), SELECTIONS, LAYERS)
    like_a = torch.tensor([[5, 4, 0, 1], [6, 3, 1, 0]], dtype=torch.int32)
    kept = check.decide("a", like_a)
    assert (kept.action, kept.checked, kept.task, kept.advantage) == ("kept", "a", "a", 0.0)
    moved = check.decide("b", like_a)
    assert (moved.action, moved.checked, moved.task) == ("rerouted", "a", "a")
    assert moved.advantage > check.thresholds.margin
    assert moved.coverage == pytest.approx(0.1) and moved.served_coverage == pytest.approx(0.9)
    check.thresholds = Thresholds(check.thresholds.margin, {"a": 0.0, "b": 0.0})  # no fit reaches 0
    lost = check.decide("b", like_a)
    assert lost.action == "exact" and lost.task == lost.checked == "a"


def test_thresholds_let_almost_no_calibration_prompt_leave_its_own_task():
    torch.manual_seed(0)
    own = torch.randint(0, 2, (200,))
    fits = -2.0 - torch.rand(200, 2)
    fits[torch.arange(200), own] += 0.8  # every prompt's own task fits it best, but noisily
    fits[0, 1 - own[0]] = 0.0  # one outlier that another task fits better
    margin, floors = derive_thresholds(fits, own, ("a", "b"), quantile=0.99)
    mine = fits[torch.arange(200), own]
    others = fits[torch.arange(200), 1 - own]
    assert margin >= 0.0 and ((others - mine) > margin).float().mean() <= 0.01
    for t, task in enumerate(("a", "b")):
        assert floors[task] == pytest.approx(float(fits[own != t, t].median()))  # others' typical fit
        assert (mine[own == t] < floors[task]).sum() == 0  # which its own prompts all clear


def test_one_task_never_reroutes():
    margin, _ = derive_thresholds(torch.tensor([[-1.0], [-2.0]]), torch.tensor([0, 0]), ("a",))
    assert margin == float("inf")


def test_validation_on_held_out_prompts_turns_a_wording_follower_off():
    honest = RouterCheck.calibrated(_profile(held_out=True), SELECTIONS, LAYERS).thresholds
    assert honest.validated_on == "held-out prompts"
    assert honest.router_accuracy == 1.0 and honest.wrongly_rerouted == 0.0 and honest.separates
    confused = RouterCheck.calibrated(_profile(held_out=True, confused=True), SELECTIONS, LAYERS).thresholds
    assert confused.router_accuracy == 0.0 and confused.wrongly_rerouted > MAX_WRONGLY_REROUTED
    assert not confused.separates
    unvalidated = RouterCheck.calibrated(_profile(), SELECTIONS, LAYERS).thresholds
    assert unvalidated.validated_on == "calibration prompts" and unvalidated.separates


def test_profile_round_trips_and_gives_the_same_check(tmp_path):
    profile = _profile(held_out=True)
    profile.save(tmp_path)
    loaded = RouterProfile.load(tmp_path)
    assert loaded.tasks == ("a", "b") and loaded.has_held_out
    for name in ("labels", "choices", "held_out_labels", "held_out_choices"):
        assert torch.equal(getattr(loaded, name), getattr(profile, name))
    first = RouterCheck.calibrated(profile, SELECTIONS, LAYERS)
    again = RouterCheck.calibrated(loaded, SELECTIONS, LAYERS)
    assert first.thresholds == again.thresholds and torch.equal(first.log_probs, again.log_probs)
    without = tmp_path / "without"
    without.mkdir()
    _profile().save(without)
    assert not RouterProfile.load(without).has_held_out


def test_missing_profile_is_none_and_a_damaged_one_names_the_file(tmp_path):
    assert RouterProfile.load(tmp_path) is None
    (tmp_path / PROFILE_FILE).write_bytes(b"not safetensors")
    with pytest.raises(PatternError, match=PROFILE_FILE):
        RouterProfile.load(tmp_path)


def test_a_profile_of_other_tasks_or_layers_is_refused():
    profile = RouterProfile(
        ("a",), torch.zeros(2, dtype=torch.int32), torch.zeros(2, 2, 4, dtype=torch.int32)
    )
    with pytest.raises(PatternError, match="task\\(s\\) b"):
        RouterCheck.calibrated(profile, SELECTIONS, LAYERS)
    wide = RouterProfile(
        ("a", "b"), torch.tensor([0, 1], dtype=torch.int32), torch.zeros(2, 3, 4, dtype=torch.int32)
    )
    with pytest.raises(PatternError, match="3 layers"):
        RouterCheck.calibrated(wide, SELECTIONS, LAYERS)
    with pytest.raises(PatternError, match="labels"):
        RouterProfile(("a",), torch.zeros(3, dtype=torch.int32), torch.zeros(2, 2, 4, dtype=torch.int32))


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_own_choices_are_the_unrestricted_routers_picks(family):
    from tiny_models import tiny_model

    from expert_store.families import get_family
    from expert_store.routing import route
    from expert_store.skeleton import moe_blocks

    model = tiny_model(family)
    gate = next(iter(moe_blocks(model).values())).gate
    hidden = torch.randn(7, model.config.hidden_size)
    logits, _, ids = route(get_family(family), gate, hidden, None)
    picked = own_choices(get_family(family), gate, logits)
    assert torch.equal(picked.sort(dim=-1).values, ids.sort(dim=-1).values)
    # with a mask, the routing changes but the own choices (from the same logits) do not
    num_experts = gate.weight.shape[0]
    allowed = torch.zeros(num_experts, dtype=torch.bool)
    allowed[-gate.top_k :] = True
    masked_logits, _, masked_ids = route(get_family(family), gate, hidden, allowed)
    assert set(masked_ids.unique().tolist()) <= set(range(num_experts - gate.top_k, num_experts))
    assert torch.equal(own_choices(get_family(family), gate, masked_logits), picked)
