"""`build_demo`: an ordinary checkpoint and task suite on disk, cached, never half-written."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from demo.build import BUILD_VERSION, STAMP_NAME, build_demo, read_stamp
from demo.suite import load_suite
from expert_store.errors import StoreExistsError


def test_checkpoint_is_ordinary_and_generates(tiny_build):
    model_dir = tiny_build.model_dir
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (model_dir / name).is_file(), name
    generation = json.loads((model_dir / "generation_config.json").read_text())
    assert (generation["eos_token_id"], generation["pad_token_id"]) == (1, 0)
    assert json.loads((model_dir / "config.json").read_text())["model_type"] == "qwen3_moe"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert type(model).__name__ == "Qwen3MoeForCausalLM" and model.config.num_experts == 4
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Reverse the word 'abc'."}], add_generation_prompt=True, tokenize=False
    )
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    output = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert output.shape[1] > inputs["input_ids"].shape[1]
    assert isinstance(tokenizer.decode(output[0, inputs["input_ids"].shape[1] :]), str)


def test_suite_and_stamp_are_written(tiny_build, tiny_sizes):
    suite = load_suite(tiny_build.tasks_file)
    assert len(suite.names) >= 6
    assert all(len(task.eval) == tiny_sizes.eval for task in suite.tasks.values())
    stamp = read_stamp(tiny_build.path)
    assert stamp == tiny_build.stamp
    assert (stamp["seed"], stamp["steps"], stamp["version"]) == (0, 12, BUILD_VERSION)
    assert set(stamp["eval"]["tasks"]) == set(suite.names)
    assert not list(tiny_build.path.parent.glob(".out.*")), "no temporary directory left behind"


def test_second_build_is_cached_and_force_rebuilds(tiny_build, tiny_spec):
    weights = tiny_build.model_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    again = build_demo(tiny_build.path, spec=tiny_spec(), progress=False)
    assert again.cached and weights.stat().st_mtime_ns == before


def test_rebuilds_on_new_spec_and_force(tmp_path, tiny_spec):
    out = tmp_path / "demo"
    first = build_demo(out, spec=tiny_spec(steps=2), progress=False)
    assert not first.cached
    forced = build_demo(out, spec=tiny_spec(steps=2), force=True, progress=False)
    assert not forced.cached
    other = build_demo(out, spec=tiny_spec(steps=3), progress=False)
    assert not other.cached and read_stamp(out)["steps"] == 3


def test_refuses_a_foreign_directory_without_force(tmp_path, tiny_spec):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("not a build")
    with pytest.raises(StoreExistsError, match="--force"):
        build_demo(out, spec=tiny_spec(steps=1), progress=False)
    assert (out / "notes.txt").is_file()


def test_interrupted_build_leaves_no_complete_looking_output(tmp_path, tiny_spec, monkeypatch):
    out = tmp_path / "demo"

    def explode(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("demo.build.write_suite", explode)
    with pytest.raises(KeyboardInterrupt):
        build_demo(out, spec=tiny_spec(steps=1), progress=False)
    assert not out.exists() and read_stamp(out) is None
    assert not list(tmp_path.iterdir())
    assert STAMP_NAME == "build.json"
