"""Calibration from a store: in-memory and layer-streamed passes agree, patterns fit their model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import save_tiny
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from expert_store.errors import PatternError
from expert_store.shard import shard_checkpoint
from expert_store.streaming import StreamedModel
from retrieval.calibrate import CalibrationOptions, calibrate, load_patterns_for_store

CHAT = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"


def _char_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {chr(32 + i): i + 3 for i in range(90)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", bos_token="<s>"
    )
    fast.chat_template = CHAT
    return fast


def _store(root: Path, family: str, seed: int = 0) -> Path:
    save_tiny(family, root / "ckpt", seed=seed)
    _char_tokenizer().save_pretrained(root / "ckpt")
    shard_checkpoint(root / "ckpt", root / "store")
    return root / "store"


def _tasks(root: Path) -> Path:
    (root / "tasks").mkdir()
    lines = [
        json.dumps(
            {"messages": [{"role": "user", "content": f"add {i} and {i + 3}"}], "response": str(2 * i + 3)}
        )
        for i in range(9)
    ]
    (root / "tasks/add.jsonl").write_text("\n".join(lines))
    (root / "tasks/rev.txt").write_text("\n".join(f"REVERSE word{i}xyz please" for i in range(7)))
    (root / "tasks/tasks.yaml").write_text("tasks:\n  add: add.jsonl\n  rev: rev.txt\n")
    return root / "tasks/tasks.yaml"


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_streamed_calibration_equals_in_memory(tmp_path, family):
    store, tasks = _store(tmp_path, family), _tasks(tmp_path)
    whole = calibrate(store, tasks, tmp_path / "whole", CalibrationOptions(batch_size=4))
    streamed = calibrate(
        store, tasks, tmp_path / "streamed", CalibrationOptions(batch_size=4, stream_layers=True)
    )
    for task in ["add", "rev", "general"]:
        a, b = whole.get(task).stats, streamed.get(task).stats
        assert a.num_tokens == b.num_tokens > 0
        # Same kernels on the same tokens, batch by batch: tolerance 1e-6 (float32 reassociation only).
        for table in ("tcess", "frequency", "mean_prob"):
            assert torch.allclose(a.table(table), b.table(table), atol=1e-6), table
    assert whole.get("add").stats.num_tokens != whole.get("rev").stats.num_tokens
    assert not torch.equal(whole.get("add").stats.tcess, whole.get("rev").stats.tcess)
    meta = json.loads((tmp_path / "whole" / "patterns.json").read_text())
    assert meta["metadata"]["moe_layers"] == ([1, 2] if family == "deepseek_v3" else [0, 1, 2])


def test_streaming_keeps_one_layers_experts_resident(tmp_path):
    store = _store(tmp_path, "qwen3_moe")
    streamed = StreamedModel(store)
    ids = torch.randint(3, 90, (2, 10))
    streamed.run([(ids, torch.ones_like(ids))])
    one_layer = streamed.store.layout.num_experts * streamed.streamer.bank.nbytes_per_slot
    assert streamed.peak_resident_bytes == one_layer
    assert streamed.streamer.bank.gate_up.shape[0] == streamed.store.layout.num_experts


def test_token_counts_exclude_padding(tmp_path):
    store, tasks = _store(tmp_path, "olmoe"), _tasks(tmp_path)
    small = calibrate(store, tasks, tmp_path / "b1", CalibrationOptions(batch_size=1))
    big = calibrate(store, tasks, tmp_path / "b9", CalibrationOptions(batch_size=9))
    assert small.get("add").stats.num_tokens == big.get("add").stats.num_tokens
    assert torch.allclose(small.get("add").stats.tcess, big.get("add").stats.tcess, atol=1e-5)


def test_patterns_from_another_model_are_refused(tmp_path):
    store_a = _store(tmp_path / "a", "qwen3_moe", seed=0)
    store_b = _store(tmp_path / "b", "qwen3_moe", seed=1)
    calibrate(store_a, _tasks(tmp_path), tmp_path / "patterns", CalibrationOptions(batch_size=4))
    assert load_patterns_for_store(tmp_path / "patterns", store_a).tasks
    with pytest.raises(PatternError, match="calibrate"):
        load_patterns_for_store(tmp_path / "patterns", store_b)


def test_keep_experts_are_retained_in_every_pattern(tmp_path):
    store, tasks = _store(tmp_path, "qwen3_moe"), _tasks(tmp_path)
    keep = tmp_path / "keep.json"
    keep.write_text(json.dumps({"1": [7]}))
    patterns = calibrate(store, tasks, tmp_path / "p", CalibrationOptions(batch_size=4, keep_experts=keep))
    from retrieval.selection import Budget

    for task in ["add", "rev", "general"]:
        assert 7 in patterns.select(task, Budget(experts_per_layer=2)).experts(1)
    keep.write_text(json.dumps({"9": [1]}))
    from expert_store.errors import TasksFileError

    with pytest.raises(TasksFileError, match="not an MoE layer"):
        calibrate(store, tasks, tmp_path / "q", CalibrationOptions(keep_experts=keep))
