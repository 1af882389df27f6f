"""Independent references: pruned routing (the original transformers model whose routers have the
pruned experts' scores set to -inf before the family's own scoring, selection and renormalisation),
and 8-bit experts (the original model with every expert's weights replaced by the store's
dequantized ones)."""

from __future__ import annotations

import contextlib
import copy
import sys
import types

import torch
import torch.nn.functional as F


class _MaskedFunctional(types.SimpleNamespace):
    """Stands in for ``torch.nn.functional`` inside a router: its ``linear`` masks pruned experts."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self._mask = mask

    def __getattr__(self, name):
        return getattr(F, name)

    def linear(self, x, weight, bias=None):
        return F.linear(x, weight, bias).masked_fill(~self._mask, float("-inf"))


@contextlib.contextmanager
def pruned_reference(model: torch.nn.Module, selection: dict[int, list[int]]):
    """Temporarily restrict ``model``'s routers to ``selection`` (layer -> allowed expert ids)."""
    undo = []
    for layer_index, allowed in selection.items():
        gate = model.model.layers[layer_index].mlp.gate
        mask = torch.zeros(gate.weight.shape[0], dtype=torch.bool, device=gate.weight.device)
        mask[list(allowed)] = True
        if hasattr(gate, "e_score_correction_bias"):  # sigmoid routers: mask the selection score
            saved = gate.e_score_correction_bias.clone()
            gate.e_score_correction_bias.masked_fill_(~mask, float("-inf"))
            undo.append(lambda gate=gate, saved=saved: gate.e_score_correction_bias.copy_(saved))
            continue
        module = sys.modules[type(gate).__module__]
        original_forward = type(gate).forward

        def forward(self, hidden, _mask=mask, _module=module, _orig=original_forward):
            saved_f = _module.F
            _module.F = _MaskedFunctional(_mask)
            try:
                return _orig(self, hidden)
            finally:
                _module.F = saved_f

        gate.forward = types.MethodType(forward, gate)
        undo.append(lambda gate=gate: delattr(gate, "forward"))
    try:
        yield model
    finally:
        for step in undo:
            step()


def dequantized_reference(model: torch.nn.Module, store) -> torch.nn.Module:
    """A copy of ``model`` whose routed experts hold ``store``'s weights dequantized to the model's
    dtype (``Scheme.dequantize``: q times its row's scale in float32, then cast)."""
    reference = copy.deepcopy(model)
    for key in store.manifest.experts:
        stored = store.expert(key)
        experts = reference.model.layers[key.layer].mlp.experts
        with torch.no_grad():
            for param, weight, scale in (
                (experts.gate_up_proj, stored.gate_up, stored.gate_up_scale),
                (experts.down_proj, stored.down, stored.down_scale),
            ):
                param[key.expert] = store.scheme.dequantize(weight, scale, param.dtype)
    return reference
