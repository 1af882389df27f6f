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

TASK_PROMPTS = {
    "arithmetic": [f"What is {a} plus {a + 7}? Add the two numbers." for a in range(12)],
    "reverse": [
        f"Reverse the letters of the word {w}."
        for w in [
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
        ]
    ],
}


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
    tasks = root / "tasks"
    tasks.mkdir()
    entries = []
    for name, prompts in TASK_PROMPTS.items():
        lines = [json.dumps({"messages": [{"role": "user", "content": p}]}) for p in prompts]
        (tasks / f"{name}.jsonl").write_text("\n".join(lines))
        entries.append(f"  {name}: {name}.jsonl")
    (tasks / "tasks.yaml").write_text("tasks:\n" + "\n".join(entries) + "\n")
    calibrate(root / "store", tasks / "tasks.yaml", root / "patterns", CalibrationOptions(batch_size=8))
    if with_index:
        build_index_for_tasks(tasks / "tasks.yaml", root / "patterns")
    return root / "store", root / "patterns"
