"""The router check: the model's own routing of a prompt, compared with the retrieved pattern.

Semantic retrieval picks a pattern from the request's words; the model has a second opinion that
costs almost nothing, its routers' choices on the prompt, computed by the prefill that runs anyway.
For every prompt token and MoE layer the router's own top-k (before any pattern's mask) is counted:
a prompt's *choices* are a table [layers, experts] of counts.

Each task's calibration prompts give how its prompts choose experts: per layer, a distribution over
experts (counts plus one, normalised). A prompt's *fit* to a task is the mean log-probability of its
choices under that task's distributions (a multinomial likelihood per choice, so long and short
prompts compare). After the prefill, when another task fits the prompt better than the retrieved one
by more than a margin, the request is re-routed to that task before its first token; when the prompt
fits even its best task less than that task's floor (its routing is like none of the calibration
prompts), it goes to exact mode (the model's own routing). A fit is used rather than the share of the
choices inside each task's retained set (its *coverage*, reported with every verdict): retained sets
of a small budget overlap and are chosen by TCESS, so coverage tells tasks apart far less well. On
the demo's calibration-worded prompts the best-fitting task is right for 98% of them, the best
covering one for 44% (keep 50%).

The thresholds come from the calibration prompts, whose choices ``taer calibrate`` stores beside the
patterns (``router_check.safetensors``, query tokens only): the margin is the largest amount by which
another task out-fits a calibration prompt's own (over ``QUANTILE`` of them). A task's floor is the
median fit of the other tasks' prompts to it: a prompt that fits its best task no better than a
typical prompt of another task does is like none of them. (A floor from the task's own prompts alone
would send every prompt worded or rendered unlike them to exact mode: a completions prompt without
the chat template the calibration prompts were rendered with, for one.)

A model's routing may follow the calibration prompts' wording rather than their task: then it
names the right task for prompts worded as in calibration and the wrong one for others, and the
check would move right retrievals. When the tasks file has held-out prompts, their choices are
stored too, and the check is validated on them: applied as if each was retrieved right, it may
re-route at most ``MAX_WRONGLY_REROUTED`` of them, else it stays off and the log says why. (Without
held-out prompts it is validated on the calibration prompts, which it passes by construction.)

Legend: N = prompts, T = tasks, L = MoE layers (pattern rows), E = experts.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from expert_store.errors import PatternError

logger = logging.getLogger(__name__)

PROFILE_FILE = "router_check.safetensors"
QUANTILE = 0.99
MAX_WRONGLY_REROUTED = 0.02
Action = Literal["kept", "rerouted", "exact"]


def count_choices(ids: torch.Tensor, rows: torch.Tensor, num_rows: int, num_experts: int) -> torch.Tensor:
    """Per-row counts [num_rows, E] of the expert ids [t, K] picked by tokens of rows ``rows`` [t]."""
    bins = (rows.unsqueeze(1) * num_experts + ids).reshape(-1)
    return (
        torch.bincount(bins, minlength=num_rows * num_experts).reshape(num_rows, num_experts).to(torch.int32)
    )


@dataclass(frozen=True, eq=False)
class RouterProfile:
    """The calibration prompts' own routing: ``choices`` [N, L, E] (int32 counts) and each prompt's
    task (``labels`` [N], indexes into ``tasks``); ``held_out_*`` the same for the tasks file's
    held-out prompts (none: empty)."""

    tasks: tuple[str, ...]
    labels: torch.Tensor
    choices: torch.Tensor
    held_out_labels: torch.Tensor | None = None
    held_out_choices: torch.Tensor | None = None

    def __post_init__(self) -> None:
        for labels, choices in ((self.labels, self.choices), (self.held_out_labels, self.held_out_choices)):
            if labels is None or choices is None:
                continue
            if choices.dim() != 3 or labels.shape != (choices.shape[0],):
                raise PatternError(
                    f"router profile: choices {tuple(choices.shape)} and labels {tuple(labels.shape)} "
                    "do not match ([N, layers, experts] and [N])"
                )
            if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < len(self.tasks):
                raise PatternError(f"router profile: a label lies outside the {len(self.tasks)} tasks")

    @property
    def has_held_out(self) -> bool:
        return self.held_out_labels is not None and len(self.held_out_labels) > 0

    def save(self, directory: str | Path) -> None:
        path = Path(directory) / PROFILE_FILE
        tensors = {"labels": self.labels.to(torch.int32), "choices": self.choices.to(torch.int32)}
        if self.has_held_out:
            tensors |= {
                "held_out_labels": self.held_out_labels.to(torch.int32),
                "held_out_choices": self.held_out_choices.to(torch.int32),
            }
        tmp = path.with_name(f".{PROFILE_FILE}.tmp")
        save_file(
            {k: v.contiguous() for k, v in tensors.items()},
            tmp,
            metadata={"tasks": json.dumps(list(self.tasks))},
        )
        tmp.replace(path)

    @classmethod
    def load(cls, directory: str | Path) -> RouterProfile | None:
        """The profile stored with the patterns in ``directory``; ``None`` if there is none (patterns
        calibrated before the router check existed)."""
        path = Path(directory) / PROFILE_FILE
        if not path.is_file():
            return None
        try:
            with safe_open(path, framework="pt") as handle:
                tasks = tuple(json.loads((handle.metadata() or {})["tasks"]))
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
            return cls(
                tasks,
                tensors["labels"],
                tensors["choices"],
                tensors.get("held_out_labels"),
                tensors.get("held_out_choices"),
            )
        except (SafetensorError, OSError, KeyError, ValueError, TypeError) as error:
            raise PatternError(f"{path} cannot be read ({error!r}); re-run `taer calibrate`") from None


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the router check found for one prompt."""

    retrieved: str  # the task retrieval chose
    checked: str  # the task whose calibration prompts the prompt's own routing fits best
    advantage: float  # how much better ``checked`` fits than ``retrieved`` (0 when the same)
    coverage: float  # share of the prompt's choices inside the retrieved pattern's retained set
    checked_coverage: float  # ... inside the checked task's
    action: Action

    @property
    def task(self) -> str:
        """The task that serves the request (in exact mode, whose pattern is the prefetch hint)."""
        return self.retrieved if self.action == "kept" else self.checked

    @property
    def served_coverage(self) -> float:
        return self.coverage if self.action == "kept" else self.checked_coverage


@dataclass(frozen=True, slots=True)
class Thresholds:
    margin: float  # re-route when another task fits the prompt better by more than this
    floors: Mapping[str, float]  # exact mode when the best-fitting task fits it less than its floor
    validated_on: str = "calibration prompts"
    router_accuracy: float = 1.0  # best-fitting task right, on the prompts it was validated on
    wrongly_rerouted: float = 0.0  # re-routed away from their own task, on those prompts

    @property
    def separates(self) -> bool:
        """Whether the check may act: it moved few validation prompts away from their own task."""
        return self.wrongly_rerouted <= MAX_WRONGLY_REROUTED


class RouterCheck:
    """How well a prompt's own routing fits each task, each task's coverage under one budget, and
    the decision rule."""

    def __init__(
        self,
        tasks: Sequence[str],
        log_probs: torch.Tensor,
        masks: torch.Tensor,
        thresholds: Thresholds,
    ) -> None:
        self.tasks = tuple(tasks)
        self.log_probs = log_probs  # [T, L*E]: per layer, each task's log-distribution over experts
        self.masks = masks  # [T, L*E]: each task's retained set under the budget
        self.thresholds = thresholds
        self._fit_and_cover = torch.cat([log_probs, masks]).T.contiguous()  # [L*E, 2T]

    @classmethod
    def calibrated(
        cls,
        profile: RouterProfile,
        selections: Mapping[str, Mapping[int, Sequence[int]]],
        moe_layers: Sequence[int],
        quantile: float = QUANTILE,
    ) -> RouterCheck:
        """The check for the tasks of ``selections`` (their retained sets under the budget served),
        fitted and thresholded on ``profile``'s calibration prompts, validated on its held-out ones."""
        tasks = tuple(selections)
        missing = [task for task in tasks if task not in profile.tasks]
        if missing:
            raise PatternError(
                f"the router profile has no calibration prompts of task(s) {', '.join(missing)}; "
                "re-run `taer calibrate`"
            )
        _, num_layers, num_experts = profile.choices.shape
        if num_layers != len(moe_layers):
            raise PatternError(
                f"the router profile has {num_layers} layers, the model {len(moe_layers)} MoE layers; "
                "re-run `taer calibrate`"
            )
        remap = torch.tensor([tasks.index(t) if t in tasks else -1 for t in profile.tasks])
        own = remap[profile.labels.long()]
        choices = profile.choices[own >= 0].float()
        own = own[own >= 0]
        log_probs = torch.stack([_log_distribution(choices[own == t]) for t in range(len(tasks))])
        masks = torch.zeros(len(tasks), num_layers, num_experts)
        for t, task in enumerate(tasks):
            for row, layer in enumerate(moe_layers):
                masks[t, row, list(selections[task][layer])] = 1.0
        check = cls(
            tasks, log_probs.reshape(len(tasks), -1), masks.reshape(len(tasks), -1), Thresholds(0.0, {})
        )
        margin, floors = derive_thresholds(check.fit(choices), own, tasks, quantile)
        check.thresholds = Thresholds(margin, floors)
        if profile.has_held_out:
            held = remap[profile.held_out_labels.long()]
            check.thresholds = check.validated(
                profile.held_out_choices[held >= 0], held[held >= 0], "held-out prompts"
            )
        else:
            check.thresholds = check.validated(choices, own, "calibration prompts")
        return check

    def fit(self, choices: torch.Tensor) -> torch.Tensor:
        """Each prompt's mean log-probability per choice under each task [N, T], for ``choices``
        [N, L, E] (0 for a prompt without choices)."""
        flat = choices.reshape(choices.shape[0], -1).float()
        return (flat @ self.log_probs.T) / flat.sum(dim=1, keepdim=True).clamp(min=1.0)

    def coverage(self, choices: torch.Tensor) -> torch.Tensor:
        """Each task's retained set's share of each prompt's choices [N, T]."""
        flat = choices.reshape(choices.shape[0], -1).float()
        return (flat @ self.masks.T) / flat.sum(dim=1, keepdim=True).clamp(min=1.0)

    def decide(self, retrieved: str, choices: torch.Tensor) -> Verdict:
        """The verdict on one prompt's ``choices`` [L, E] served with ``retrieved``'s pattern."""
        flat = choices.reshape(1, -1).float()
        both = (flat @ self._fit_and_cover) / max(float(flat.sum()), 1.0)  # [1, 2T]: one product
        values = both[0].tolist()
        fits, covered = values[: len(self.tasks)], values[len(self.tasks) :]
        best, mine = max(range(len(fits)), key=fits.__getitem__), self.tasks.index(retrieved)
        advantage = fits[best] - fits[mine]
        if fits[best] < self.thresholds.floors.get(self.tasks[best], float("-inf")):
            action: Action = "exact"
        elif advantage > self.thresholds.margin:
            action = "rerouted"
        else:
            action = "kept"
        return Verdict(retrieved, self.tasks[best], advantage, covered[mine], covered[best], action)

    def validated(self, choices: torch.Tensor, own: torch.Tensor, name: str) -> Thresholds:
        """The thresholds, with what the check does to prompts ``choices`` [N, L, E] of tasks ``own``
        [N] (indexes into ``tasks``) as if each was retrieved right."""
        if len(own) == 0:
            return self.thresholds
        verdicts = [self.decide(self.tasks[int(t)], c) for c, t in zip(choices, own, strict=True)]
        truth = [self.tasks[int(t)] for t in own]
        return Thresholds(
            self.thresholds.margin,
            self.thresholds.floors,
            validated_on=name,
            router_accuracy=sum(v.checked == t for v, t in zip(verdicts, truth, strict=True)) / len(truth),
            wrongly_rerouted=sum(v.action == "rerouted" for v in verdicts) / len(truth),
        )


def derive_thresholds(
    fits: torch.Tensor, own: torch.Tensor, tasks: Sequence[str], quantile: float = QUANTILE
) -> tuple[float, dict[str, float]]:
    """(margin, floors) from calibration prompts' fit [N, T] to every task and their own task [N]:
    a right retrieval is re-routed for at most ``1 - quantile`` of them (see the module's note)."""
    mine = fits.gather(1, own.unsqueeze(1)).squeeze(1)  # [N]
    others = fits.scatter(1, own.unsqueeze(1), float("-inf")).amax(dim=1)  # [N]
    margin = float("inf")
    if fits.shape[0] and fits.shape[1] > 1:
        margin = max(0.0, float(torch.quantile(others - mine, quantile)))
    floors = {}
    for t, task in enumerate(tasks):
        foreign = fits[own != t, t]
        if len(foreign):
            floors[task] = float(foreign.median())
    return margin, floors


def _log_distribution(choices: torch.Tensor) -> torch.Tensor:
    """Per layer, the log of the experts' share of ``choices`` [n, L, E] (add-one smoothed) [L, E]."""
    counts = choices.sum(dim=0) + 1.0
    return (counts / counts.sum(dim=-1, keepdim=True)).log()
