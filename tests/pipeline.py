"""A whole tiny pipeline for tests: checkpoint with a character tokenizer and chat template, store,
patterns and retrieval index. Nothing here is specific to taer's demo model."""

from __future__ import annotations

import json
from pathlib import Path

from tiny_models import save_tiny
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)

WORDS = (
    "apple",
    "river",
    "stone",
    "cloud",
    "tiger",
    "plant",
    "music",
    "light",
    "dream",
    "ocean",
    "house",
    "bread",
)
TASK_PROMPTS = {
    "arithmetic": [f"What is {a} plus {a + 7}? Add the two numbers." for a in range(12)],
    "reverse": [f"Reverse the letters of the word {w}." for w in WORDS],
}


def write_tasks(tasks: Path, prompts: dict[str, list[str]]) -> Path:
    """A tasks directory: one chat JSONL file a task and ``tasks.yaml`` naming them."""
    tasks.mkdir()
    entries = []
    for name, texts in prompts.items():
        lines = [json.dumps({"messages": [{"role": "user", "content": t}]}) for t in texts]
        (tasks / f"{name}.jsonl").write_text("\n".join(lines))
        entries.append(f"  {name}: {name}.jsonl")
    (tasks / "tasks.yaml").write_text("tasks:\n" + "\n".join(entries) + "\n")
    return tasks


def char_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {chr(32 + i): i + 3 for i in range(90)}
    vocab["\n"] = 93
    vocab |= {"{": 94, "}": 95}  # the tiny models' vocabulary is 96 wide: JSON objects fit
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    # The characters, not joined with spaces (ByteFallback: a decoder the grammar engine reads).
    tokenizer.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", bos_token="<s>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_pipeline(
    root: Path, family: str = "qwen3_moe", with_index: bool = True, expert_dtype: str = "source"
) -> tuple[Path, Path]:
    """(store dir, patterns dir) under ``root``; ``expert_dtype`` as `taer shard --expert-dtype`."""
    from expert_store.shard import shard_checkpoint
    from retrieval.build import build_index_for_tasks
    from retrieval.calibrate import CalibrationOptions, calibrate

    save_tiny(family, root / "ckpt")
    char_tokenizer().save_pretrained(root / "ckpt")
    shard_checkpoint(root / "ckpt", root / "store", expert_dtype=expert_dtype)
    tasks = write_tasks(root / "tasks", TASK_PROMPTS)
    calibrate(root / "store", tasks / "tasks.yaml", root / "patterns", CalibrationOptions(batch_size=8))
    if with_index:
        build_index_for_tasks(tasks / "tasks.yaml", root / "patterns")
    return root / "store", root / "patterns"


SEPARABLE_PROMPTS = {
    "digits": [f"{a}+{a * 7 % 100}={a + a * 7 % 100}; {a * 3}+{a * 11}=" * 3 for a in range(10, 22)],
    "letters": [f"reverse the word {w} and then spell {w} backwards" for w in WORDS],
}


def build_separable_pipeline(root: Path) -> tuple[Path, Path]:
    """(store dir, patterns dir) of a tiny Qwen3-MoE whose routers separate two tasks: digit and
    symbol tokens carry one direction of the hidden state, letters the opposite, and every router
    sends the first direction to experts 0-3 and the second to experts 4-7. With half the experts
    kept, the tasks' retained sets differ, and a prompt's own routing says which task it is. The
    experts' weights are scaled up so that which experts run changes the answer."""
    import torch

    from expert_store.shard import shard_checkpoint
    from retrieval.calibrate import CalibrationOptions, calibrate

    model = save_tiny("qwen3_moe", root / "ckpt")
    tokenizer = char_tokenizer()
    with torch.no_grad():
        direction = torch.zeros(model.config.hidden_size)
        direction[0] = 1.0
        vocab = tokenizer.get_vocab()
        for char, token in vocab.items():
            if len(char) == 1 and (char.isdigit() or char in "+=;"):
                model.model.embed_tokens.weight[token] += 4 * direction
            elif len(char) == 1 and char.isalpha():
                model.model.embed_tokens.weight[token] -= 4 * direction
        for layer in model.model.layers:
            for param in layer.mlp.experts.parameters():
                param.mul_(8.0)
            gate = layer.mlp.gate.weight  # [E, H]
            gate.normal_(0, 0.3)
            gate[:4] += 3 * direction
            gate[4:] -= 3 * direction
    model.save_pretrained(root / "ckpt")
    tokenizer.save_pretrained(root / "ckpt")
    shard_checkpoint(root / "ckpt", root / "store")
    tasks = write_tasks(root / "tasks", SEPARABLE_PROMPTS)
    calibrate(root / "store", tasks / "tasks.yaml", root / "patterns", CalibrationOptions(batch_size=8))
    return root / "store", root / "patterns"
