"""Training: the fast experts path equals transformers' own, the loss falls, runs are reproducible."""

from __future__ import annotations

import itertools

import pytest
import torch

from demo.data import IGNORE_INDEX, TrainingStream, pack, pad
from demo.experts import grouped_experts
from demo.model import build_model
from demo.tokenizer import build_tokenizer
from demo.train import TrainConfig, train


@pytest.fixture
def make_model(tiny_model_config):
    def make(seed: int = 0):
        torch.manual_seed(seed)
        tokenizer = build_tokenizer()
        return build_model(tiny_model_config, tokenizer), tokenizer

    return make


def _logits_and_grads(model, batch):
    model.zero_grad()
    out = model(**batch.model_inputs())
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_grouped_experts_match_eager_forward_and_backward(make_model, tiny_sizes, tiny_model_config):
    model, tokenizer = make_model()
    model.set_experts_implementation("eager")
    batch = TrainingStream(tokenizer, seed=0, batch_size=8, sizes=tiny_sizes).next_batch()
    reference_logits, reference_grads = _logits_and_grads(model, batch)
    with grouped_experts(model) as switched:
        assert switched == tiny_model_config.num_layers
        logits, grads = _logits_and_grads(model, batch)
    torch.testing.assert_close(logits, reference_logits, rtol=1e-5, atol=1e-5)
    assert grads.keys() == reference_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert "forward" not in vars(model.model.layers[0].mlp.experts)


@pytest.mark.parametrize("loss_on", ["answer", "all"])
def test_batches_label_the_answer(loss_on, tiny_sizes):
    tokenizer = build_tokenizer()
    pairs = TrainingStream(tokenizer, seed=0, batch_size=6, sizes=tiny_sizes).texts()
    stream = TrainingStream(tokenizer, seed=0, batch_size=6, sizes=tiny_sizes, loss_on=loss_on)
    batch = pad(stream.sequences(), tokenizer.pad_token_id)
    for row, (prompt, answer) in enumerate(pairs):
        assert answer.endswith(tokenizer.eos_token)
        labelled = batch.labels[row][batch.labels[row] != IGNORE_INDEX]
        expected = answer if loss_on == "answer" else prompt[len("<|user|>") :] + answer
        assert tokenizer.decode(labelled) == expected
        length = len(tokenizer(prompt + answer, add_special_tokens=False)["input_ids"])
        assert batch.attention_mask[row].tolist() == [1] * length + [0] * (batch.input_ids.shape[1] - length)


@pytest.mark.parametrize("loss_on", ["answer", "all"])
def test_packing_changes_nothing_but_the_shape(make_model, tiny_sizes, loss_on):
    model, tokenizer = make_model()
    sequences = TrainingStream(
        tokenizer, seed=0, batch_size=12, sizes=tiny_sizes, loss_on=loss_on
    ).sequences()
    packed, padded = pack(sequences, 96, tokenizer.pad_token_id), pad(sequences, tokenizer.pad_token_id)
    assert packed.input_ids.numel() < 0.8 * padded.input_ids.numel()
    assert int((packed.labels != IGNORE_INDEX).sum()) == int((padded.labels != IGNORE_INDEX).sum())
    with torch.no_grad():
        packed_out, padded_out = model(**packed.model_inputs()), model(**padded.model_inputs())
    torch.testing.assert_close(packed_out.loss, padded_out.loss)
    # Every packed sequence sees exactly what it sees alone: same logits, position by position.
    index_of = {tuple(sequence.ids): i for i, sequence in enumerate(sequences)}
    seen = set()
    for row in range(packed.input_ids.shape[0]):
        starts = [*packed.position_ids[row].eq(0).nonzero().flatten().tolist(), packed.input_ids.shape[1]]
        for start, end in itertools.pairwise(starts):
            index = index_of.get(tuple(packed.input_ids[row, start:end].tolist()))
            if index is None:
                continue  # the padding at the end of a row
            seen.add(index)
            torch.testing.assert_close(
                packed_out.logits[row, start:end],
                padded_out.logits[index, : end - start],
                rtol=1e-4,
                atol=1e-4,
            )
    assert seen == set(range(len(sequences)))


def test_short_training_lowers_the_loss(make_model, tiny_sizes):
    model, tokenizer = make_model()
    config = TrainConfig(steps=40, batch_size=16, warmup_steps=4, learning_rate=1e-2, num_threads=1)
    result = train(model, tokenizer, seed=0, config=config, sizes=tiny_sizes, progress=False)
    assert len(result.losses) == 40
    assert result.mean_loss(-5, None) < 0.7 * result.mean_loss(0, 5)
    assert not model.training


def test_training_is_deterministic_for_a_seed(make_model, tiny_sizes):
    config = TrainConfig(steps=3, batch_size=8, warmup_steps=1, num_threads=1)
    states = []
    for _ in range(2):
        model, tokenizer = make_model(seed=5)
        train(model, tokenizer, seed=5, config=config, sizes=tiny_sizes, progress=False)
        states.append(model.state_dict())
    for name, tensor in states[0].items():
        assert torch.equal(tensor, states[1][name]), name
