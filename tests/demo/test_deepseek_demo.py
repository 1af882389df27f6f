"""The DeepSeek-V3-family demo (`taer demo build --family deepseek_v3`): its shape, a build that is
deterministic from its seed, a router bias that training moves, the default demo left exactly as it
was, and the whole pipeline (shard, calibrate, index, serve) on it."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from engine_helpers import chat_ids, started_engine
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MLP, DeepseekV3MoE

from demo.build import BuildResult, BuildSpec, build_demo, read_stamp
from demo.data import TrainingStream
from demo.deepseek import DeepseekModelConfig, build_deepseek_model
from demo.deepseek_build import DeepseekBuildSpec
from demo.deepseek_train import DeepseekTrainConfig
from demo.prepare import DemoPaths, prepare_demo
from demo.suite import SuiteSizes, generate_suite, load_suite
from demo.tasks import TASKS
from demo.tasks_extended import EXTRA_TASKS, task_set
from demo.tokenizer import build_tokenizer
from demo.train import TrainConfig
from expert_store.errors import StoreExistsError
from server.engine_api import GenerationRequest, SamplingParams
from server.loading import ServeConfig

TINY_MODEL = DeepseekModelConfig(
    num_layers=2,
    hidden_size=32,
    num_heads=2,
    dense_intermediate_size=48,
    num_experts=16,
    experts_per_token=4,
    num_groups=4,
    groups_per_token=2,
    expert_intermediate_size=16,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=8,
    v_head_dim=8,
)
TINY_SIZES = SuiteSizes(calibration=4, eval=3, heldout=2, examples=2)


def tiny_spec(seed: int = 0, steps: int = 4) -> DeepseekBuildSpec:
    base = TrainConfig(steps=steps, batch_size=10, warmup_steps=2, num_threads=1)
    # A larger bias step than the real build's, so that four steps move it visibly.
    train = DeepseekTrainConfig(base=base, bias_gamma=0.01)
    return DeepseekBuildSpec(seed=seed, model=TINY_MODEL, train=train, sizes=TINY_SIZES)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the engine's thread hands results to an asyncio loop


@pytest.fixture(scope="module")
def deepseek_build(tmp_path_factory):
    return build_demo(tmp_path_factory.mktemp("deepseek") / "demo", spec=tiny_spec(), progress=False)


def test_the_default_shape_is_deepseek_v3s():
    config = DeepseekModelConfig().hf_config(build_tokenizer())
    assert config.model_type == "deepseek_v3"
    assert config.n_routed_experts >= 64 and config.num_experts_per_tok in (6, 8)
    assert config.n_shared_experts == 1 and config.first_k_dense_replace == 1
    assert config.n_group > 1 and config.topk_group < config.n_group


def test_the_first_layer_is_dense_and_the_rest_route_with_a_shared_expert():
    model = build_deepseek_model(TINY_MODEL, build_tokenizer())
    first, *rest = model.model.layers
    assert isinstance(first.mlp, DeepseekV3MLP)
    assert rest and all(isinstance(layer.mlp, DeepseekV3MoE) for layer in rest)
    assert all(layer.mlp.shared_experts is not None for layer in rest)


def test_the_build_is_an_ordinary_checkpoint_on_ten_tasks_with_a_trained_bias(deepseek_build):
    model = AutoModelForCausalLM.from_pretrained(deepseek_build.model_dir)
    assert type(model).__name__ == "DeepseekV3ForCausalLM"
    assert (model.config.n_routed_experts, model.config.n_group, model.config.topk_group) == (16, 4, 2)
    biases = [layer.mlp.gate.e_score_correction_bias for layer in model.model.layers[1:]]
    assert all(bias.abs().max() > 0 for bias in biases), "training moved the correction bias"
    # Sign steps of 0.01: every entry is a multiple of the step, within float32 rounding.
    steps = torch.cat(biases) / 0.01
    assert torch.allclose(steps, steps.round(), atol=1e-3)
    suite = load_suite(deepseek_build.tasks_file)
    assert len(suite.names) >= 10 and suite.names == [t.name for t in task_set("extended")]
    stamp = read_stamp(deepseek_build.path)
    assert stamp["family"] == "deepseek_v3" and set(stamp["eval"]["tasks"]) == set(suite.names)


def test_the_build_is_deterministic_from_its_seed(deepseek_build, tmp_path):
    again = build_demo(tmp_path / "again", spec=tiny_spec(), progress=False)
    first = load_file(deepseek_build.model_dir / "model.safetensors")
    second = load_file(again.model_dir / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert any("e_score_correction_bias" in name for name in first), "the bias is saved"
    other = build_demo(tmp_path / "other", spec=tiny_spec(seed=1), progress=False)
    assert not torch.equal(
        first["lm_head.weight"], load_file(other.model_dir / "model.safetensors")["lm_head.weight"]
    )


def test_a_build_of_the_other_family_is_neither_taken_nor_replaced_without_force(deepseek_build):
    assert build_demo(deepseek_build.path, spec=tiny_spec(), progress=False).cached
    assert "family" not in BuildSpec().key() and DeepseekBuildSpec().key()["family"] == "deepseek_v3"
    # e.g. a benchmark that prepares the default demo under a directory holding this one
    with pytest.raises(StoreExistsError, match="holds the deepseek_v3 demo"):
        build_demo(deepseek_build.path, spec=BuildSpec(), progress=False)
    assert read_stamp(deepseek_build.path)["family"] == "deepseek_v3"


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def test_the_default_demo_is_unchanged():
    """The default build's key, suite and training stream hash as before the DeepSeek-V3 demo: a change
    would invalidate every cached demo and the README's figures."""
    assert _digest(BuildSpec().key()) == "5841eca57fa0bd4ce89e12ddb271f666f486ee1a52bd9bfaf1941d3f31bd079f"
    suite = generate_suite(0)
    assert suite.names == [t.name for t in TASKS] and len(suite.names) == 6
    splits = {
        name: {
            split: [[e.query, e.answer] for e in task.split(split)] + [list(task.examples)]
            for split in ("calibration", "eval", "heldout")
        }
        for name, task in suite.tasks.items()
    }
    assert _digest(splits) == "a07d084c3b057fac3975075001d39721e7ce85e640b6cde13b45f4e02eb0d871"
    stream = TrainingStream(build_tokenizer(), seed=0, batch_size=64)
    assert _digest(stream.texts()) == "6f57a4a879cfc268df73aa1c9ad36e6b3ea3fb31d102cfcf22d810fa726f417a"


def test_the_extended_set_adds_tasks_without_changing_the_shared_ones():
    sizes = SuiteSizes(calibration=8, eval=8, heldout=4, examples=2)
    default, extended = generate_suite(0, sizes), generate_suite(0, sizes, task_set("extended"))
    assert len(extended.names) == 10 and extended.names[:6] == default.names
    assert all(extended.tasks[name] == default.tasks[name] for name in default.names)
    for spec in EXTRA_TASKS:
        task = extended.tasks[spec.name]
        assert task.eval and task.heldout and all(e.answer for e in task.eval)
    with pytest.raises(ValueError, match="unknown task set"):
        task_set("nope")


@pytest.mark.anyio
async def test_the_served_demo_answers_as_transformers_with_every_expert_kept(deepseek_build, tmp_path):
    paths = DemoPaths(deepseek_build.path, tmp_path / "store", tmp_path / "patterns")
    prepared = prepare_demo(paths, spec=tiny_spec())
    assert json.loads((prepared.store / "manifest.json").read_text())["family"] == "deepseek_v3"
    text = TASKS[0].phrasings[0].format(word="garden")
    engine = await started_engine(ServeConfig(prepared.store, prepared.patterns, keep=1.0))
    try:
        ids = chat_ids(engine.tokenizer, text)
        sampling = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
        served = [
            t
            async for output in engine.generate(GenerationRequest("a", ids, text, sampling))
            for t in output.token_ids
        ]
    finally:
        await engine.shutdown()
    model = AutoModelForCausalLM.from_pretrained(prepared.model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(prepared.model_dir)
    prompt = torch.tensor([ids])
    # min_new_tokens keeps transformers going past the end token, as ignore_eos does the engine.
    direct = model.generate(
        prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    assert served == direct[0, prompt.shape[1] :].tolist()


def test_taer_demo_build_and_prepare_take_the_family(tmp_path, monkeypatch):
    import demo.prepare
    import server.cli.demo
    from server.cli import main

    built, prepared = [], []
    monkeypatch.setattr(
        server.cli.demo,
        "build_demo",
        lambda out, spec, force: built.append((out, spec)) or BuildResult(out, True, {}),
    )
    monkeypatch.setattr(
        demo.prepare, "prepare_demo", lambda paths, encoder_path, **kwargs: prepared.append(kwargs) or paths
    )
    assert main(["demo", "build", "--family", "deepseek_v3", "--steps", "7", "--out", str(tmp_path)]) == 0
    assert main(["demo", "build"]) == 0
    (out, spec), (default_out, default_spec) = built
    assert isinstance(spec, DeepseekBuildSpec) and spec.train.base.steps == 7 and out == tmp_path
    assert default_spec == BuildSpec() and default_out.name == "demo"
    assert main(["demo", "prepare", "--family", "deepseek_v3", "--data", str(tmp_path)]) == 0
    assert isinstance(prepared[0]["spec"], DeepseekBuildSpec)
