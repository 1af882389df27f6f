"""``server.sampling.next_token`` on the logits the engine hands it: a row of the batch's logits made
under ``torch.inference_mode()``. A repetition penalty used to be applied in place there, which torch
refuses outside inference mode (a 500 for every request of the batch, found by the schema fuzzer
against a real `taer serve`), and would have changed the batch's logits.

Legend: B = batch rows, V = vocabulary.
"""

from __future__ import annotations

import pytest
import torch

from server.engine_api import SamplingParams
from server.sampling import make_generator, next_token

SEEN = [3, 7, 7, 11]


def _batch_logits() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        return torch.randn(2, 20, generator=generator) * 3  # [B, V], an inference tensor


@pytest.mark.parametrize("penalty", [0.01, 0.5, 2.0, 100.0])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_a_repetition_penalty_on_an_inference_row_leaves_the_batch_alone(penalty, temperature):
    logits = _batch_logits()
    before = logits.clone()
    params = SamplingParams(temperature=temperature, repetition_penalty=penalty, seed=5)
    token = next_token(logits[1], params, SEEN, make_generator(params))
    assert torch.equal(logits, before)
    again = next_token(before[1].clone(), params, SEEN, make_generator(params))  # an ordinary tensor
    assert token == again


def test_the_penalty_changes_the_greedy_choice_as_transformers_does():
    with torch.inference_mode():
        logits = torch.tensor([[0.0, 4.0, 3.0, -1.0]])  # [B, V]
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    assert next_token(logits[0], params, [], None) == 1
    assert next_token(logits[0], params, [1], None) == 2  # 4 / 2 < 3
