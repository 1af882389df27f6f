"""Log probabilities of generated and prompt tokens, from the model's logits.

They are the model's own distribution under the request's routing: ``log_softmax`` of the logits,
before the repetition penalty, temperature, top-k/top-p or an output constraint change them (what
vLLM calls ``raw_logprobs``, its default). Computed in float32.

Legend: S = positions, V = vocabulary.
"""

from __future__ import annotations

import torch

from server.engine_api import TokenLogprob


def score_token(logits: torch.Tensor, token: int, num_top: int) -> TokenLogprob:
    """``token``'s log probability under ``logits`` [V], with the ``num_top`` most likely tokens."""
    return score_tokens(logits.unsqueeze(0), [token], num_top)[0]


def score_tokens(logits: torch.Tensor, tokens: list[int], num_top: int) -> list[TokenLogprob]:
    """Each ``tokens[i]``'s log probability under ``logits[i]`` [S, V] (the logits of the position
    before it), with the ``num_top`` most likely tokens at each position."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [S, V]
    ids = torch.tensor(tokens, device=logprobs.device)
    chosen = logprobs.gather(1, ids.unsqueeze(1)).squeeze(1).tolist()  # [S]
    if num_top == 0:
        return [TokenLogprob(token, value) for token, value in zip(tokens, chosen, strict=True)]
    top = torch.topk(logprobs, min(num_top, logprobs.shape[-1]), dim=-1)
    top_values, top_ids = top.values.tolist(), top.indices.tolist()
    return [
        TokenLogprob(token, value, tuple(zip(ids_, values, strict=True)))
        for token, value, ids_, values in zip(tokens, chosen, top_ids, top_values, strict=True)
    ]
