"""``server.structured`` with real tokenizers built offline: the demo's byte-level tokenizer (one token
per byte), a byte-level BPE trained here (tokens such as ``{"`` and ``":`` that cross JSON's
structure) and the tests' character tokenizer (no decoder). A "model" of random logits, masked and
sampled with a seeded generator, must produce text that parses and validates against the schema.

Legend: V = the model's vocabulary (the logits' width, past the tokenizer's own ids).
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema  # through the dev extras (schemathesis)
import pytest
import torch
from pipeline import char_tokenizer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from demo.tokenizer import build_tokenizer
from expert_store.errors import RequestError
from server.structured import (
    MAX_CONSTRAINT_BYTES,
    GrammarCompiler,
    OutputConstraint,
)

PADDING = 7  # logits wider than the tokenizer, as real checkpoints pad their vocabulary
MAX_STEPS = 4000

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
    },
    "required": ["name", "age", "role"],
    "additionalProperties": False,
}
SCORES = {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 5}
NESTED = {
    "type": "object",
    "properties": {
        "point": {
            "type": "object",
            "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
            "required": ["x", "y"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "meta": {
            "type": "object",
            "properties": {"flag": {"type": "boolean"}, "note": {"type": ["string", "null"], "maxLength": 8}},
            "required": ["flag"],
            "additionalProperties": False,
        },
    },
    "required": ["point", "tags", "meta"],
    "additionalProperties": False,
}


def _bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on a little JSON, so that its merges span quotes, colons and braces."""
    samples = [{"name": f"user {i}", "age": i, "role": "admin", "tags": ["red", "blue"]} for i in range(40)]
    corpus = [json.dumps(sample) for sample in samples] + ["the quick brown fox jumps over the lazy dog"] * 5
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|end|>")


@pytest.fixture(scope="module", params=["byte", "bpe"])
def tokenizer(request):
    return build_tokenizer() if request.param == "byte" else _bpe_tokenizer()


@pytest.fixture(scope="module")
def compiler(tokenizer):
    return GrammarCompiler(tokenizer, len(tokenizer) + PADDING)


@pytest.fixture(scope="module")
def byte_compiler():
    tokenizer = build_tokenizer()
    return tokenizer, GrammarCompiler(tokenizer, len(tokenizer) + PADDING)


def _generate(compiler: GrammarCompiler, tokenizer, constraint: OutputConstraint, seed: int) -> list[int]:
    """Sample from masked random logits until the grammar is done or EOS comes; the tokens before EOS."""
    matcher = compiler.matcher(constraint)
    generator = torch.Generator().manual_seed(seed)
    tokens: list[int] = []
    for _ in range(MAX_STEPS):
        if matcher.is_done:
            return tokens
        logits = torch.randn(compiler.vocab_size, generator=generator)  # [V]
        matcher.mask_logits(logits)
        token = int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
        matcher.accept(token)
        if token == tokenizer.eos_token_id:
            return tokens
        tokens.append(token)
    raise AssertionError(f"no end after {MAX_STEPS} tokens: {tokenizer.decode(tokens)[:200]!r}")


@pytest.mark.parametrize("schema", [PERSON, SCORES, NESTED], ids=["person", "scores", "nested"])
@pytest.mark.parametrize("seed", [0, 1])
def test_random_logits_generate_json_that_validates(compiler, tokenizer, schema, seed):
    tokens = _generate(compiler, tokenizer, OutputConstraint("json_schema", schema), seed)
    assert not set(tokens) & set(tokenizer.all_special_ids)
    jsonschema.validate(json.loads(tokenizer.decode(tokens)), schema)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_json_object_gives_a_json_object(compiler, tokenizer, seed):
    value = json.loads(
        tokenizer.decode(_generate(compiler, tokenizer, OutputConstraint("json_object"), seed))
    )
    assert isinstance(value, dict)


def test_an_empty_schema_is_any_json(compiler, tokenizer):
    json.loads(tokenizer.decode(_generate(compiler, tokenizer, OutputConstraint("json_schema", {}), seed=0)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_regex_output_matches_in_full(compiler, tokenizer, seed):
    pattern = r"[A-Z][a-z]{2,8}-[0-9]{3}( ok| fail)?"
    text = tokenizer.decode(_generate(compiler, tokenizer, OutputConstraint("regex", pattern), seed))
    assert re.fullmatch(pattern, text), text


def test_regex_with_a_tokenizer_without_decoder():
    tokenizer = char_tokenizer()  # word level, one token per character, logits 2 wider
    compiler = GrammarCompiler(tokenizer, 96)
    pattern = r"(yes|no), [0-9]{2}"
    tokens = _generate(compiler, tokenizer, OutputConstraint("regex", pattern), seed=0)
    assert re.fullmatch(pattern, "".join(tokenizer.convert_ids_to_tokens(tokens)))


def test_when_done_only_eos_is_allowed(byte_compiler):
    tokenizer, compiler = byte_compiler
    matcher = compiler.matcher(OutputConstraint("json_schema", PERSON))
    for token in tokenizer.encode('{"name":"Ann","age":7,"role":"user"}', add_special_tokens=False):
        assert not matcher.is_done
        assert matcher.allowed()[token]
        matcher.accept(token)
    assert matcher.is_done
    assert matcher.allowed().nonzero().flatten().tolist() == [tokenizer.eos_token_id]


def test_a_disallowed_token_is_a_runtime_error(byte_compiler):
    tokenizer, compiler = byte_compiler
    matcher = compiler.matcher(OutputConstraint("json_object"))
    (letter,) = tokenizer.encode("x", add_special_tokens=False)
    assert not matcher.allowed()[letter]
    with pytest.raises(RuntimeError, match="not allowed"):
        matcher.accept(letter)


def test_extra_eos_ids_are_allowed_at_the_end():
    tokenizer = build_tokenizer()
    compiler = GrammarCompiler(tokenizer, len(tokenizer), eos_token_ids=[tokenizer.eos_token_id, 0])
    matcher = compiler.matcher(OutputConstraint("regex", "ab"))
    for token in tokenizer.encode("ab", add_special_tokens=False):
        matcher.accept(token)
    assert matcher.allowed().nonzero().flatten().tolist() == [0, tokenizer.eos_token_id]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mask_logits_leaves_allowed_logits_and_sets_the_rest_to_minus_inf(byte_compiler, dtype):
    tokenizer, compiler = byte_compiler
    matcher = compiler.matcher(OutputConstraint("json_schema", PERSON))
    for token in tokenizer.encode('{"name":"A', add_special_tokens=False):
        matcher.accept(token)
    logits = torch.randn(compiler.vocab_size, generator=torch.Generator().manual_seed(0)).to(dtype)  # [V]
    masked = logits.clone()
    matcher.mask_logits(masked)
    allowed = matcher.allowed()
    assert 0 < int(allowed.sum()) < len(tokenizer)
    assert torch.equal(masked[allowed], logits[allowed])
    assert bool((masked[~allowed] == float("-inf")).all())
    assert not allowed[len(tokenizer) :].any()  # the padding past the tokenizer: never


@pytest.mark.gpu
def test_mask_logits_on_the_gpu_matches_the_cpu(byte_compiler):
    _, compiler = byte_compiler
    matcher = compiler.matcher(OutputConstraint("regex", "[0-9]+"))
    logits = torch.randn(compiler.vocab_size, generator=torch.Generator().manual_seed(0))  # [V]
    on_gpu = logits.cuda()
    matcher.mask_logits(logits)
    matcher.mask_logits(on_gpu)
    assert torch.equal(on_gpu.cpu(), logits)


def test_mask_logits_refuses_a_row_of_the_wrong_width(byte_compiler):
    _, compiler = byte_compiler
    with pytest.raises(ValueError, match="shape"):
        compiler.matcher(OutputConstraint("json_object")).mask_logits(torch.zeros(compiler.vocab_size - 1))


def test_the_cache_returns_the_same_compiled_grammar(byte_compiler):
    _, compiler = byte_compiler
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}}}
    reordered = {"properties": {"b": {"type": "string"}, "a": {"type": "integer"}}, "type": "object"}
    first = compiler.compile(OutputConstraint("json_schema", schema))
    assert compiler.compile(OutputConstraint("json_schema", reordered)) is first
    assert compiler.compile(OutputConstraint("json_object")) is not first


def test_the_cache_forgets_the_least_recently_used():
    tokenizer = build_tokenizer()
    compiler = GrammarCompiler(tokenizer, len(tokenizer), max_cached=2)
    a, b, c = (OutputConstraint("regex", pattern) for pattern in ("a+", "b+", "c+"))
    first_a, first_b = compiler.compile(a), compiler.compile(b)
    assert compiler.compile(a) is first_a  # a is now the most recent: c evicts b
    compiler.compile(c)
    assert compiler.compile(a) is first_a
    assert compiler.compile(b) is not first_b


def test_compiling_from_several_threads_gives_one_grammar(byte_compiler):
    tokenizer, compiler = byte_compiler
    constraint = OutputConstraint("json_schema", {"type": "array", "items": {"type": "boolean"}})
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: compiler.compile(constraint), range(8)))
        masks = list(pool.map(lambda _: compiler.matcher(constraint).allowed(), range(8)))
    assert all(result is results[0] for result in results)
    (bracket,) = tokenizer.encode("[", add_special_tokens=False)
    assert all(mask.nonzero().flatten().tolist() == masks[0].nonzero().flatten().tolist() for mask in masks)
    assert masks[0][bracket]


def test_matchers_of_one_grammar_are_independent(byte_compiler):
    tokenizer, compiler = byte_compiler
    constraint = OutputConstraint("regex", "(ab)+")
    one, two = compiler.matcher(constraint), compiler.matcher(constraint)
    for token in tokenizer.encode("ab", add_special_tokens=False):
        one.accept(token)
    assert one.allowed()[tokenizer.eos_token_id]
    assert not two.allowed()[tokenizer.eos_token_id]


@pytest.mark.parametrize(
    "constraint, problem",
    [
        (OutputConstraint("json_schema", {"type": "nonsense"}), "Invalid type: nonsense"),
        (
            OutputConstraint("json_schema", {"type": "object", "properties": [1]}),
            "properties must be an object",
        ),
        (OutputConstraint("json_schema", {"type": "object", "required": "a"}), "'required'"),
        (OutputConstraint("json_schema", {"not": {"type": "string"}}), "Unimplemented keys"),
        (OutputConstraint("json_schema", {"type": "array", "minItems": 5, "maxItems": 2}), "Unsatisfiable"),
        (OutputConstraint("json_schema", {"const": float("nan")}), "not plain JSON"),
        (OutputConstraint("regex", "(ab"), "unclosed group"),
        (OutputConstraint("regex", r"(\w)\1"), "backreferences are not supported"),
    ],
)
@pytest.mark.parametrize("param", ["response_format", "parameters.grammar"])
def test_an_unusable_constraint_is_a_request_error_naming_the_problem(
    byte_compiler, constraint, problem, param
):
    _, compiler = byte_compiler
    constraint = dataclasses.replace(constraint, param=param)
    with pytest.raises(RequestError, match=re.escape(problem)) as caught:
        compiler.check(constraint)
    assert caught.value.param == param
    assert str(caught.value).startswith(param)
    assert "\n" not in str(caught.value)


def test_a_huge_schema_is_refused_before_compiling(byte_compiler):
    _, compiler = byte_compiler
    properties = {f"field_{i}": {"type": "string"} for i in range(MAX_CONSTRAINT_BYTES // 20)}
    with pytest.raises(RequestError, match="over the limit") as caught:
        compiler.check(OutputConstraint("json_schema", {"type": "object", "properties": properties}))
    assert caught.value.param == "response_format"


def test_constraints_cross_processes_by_pickle():
    constraint = OutputConstraint("json_schema", NESTED)
    assert pickle.loads(pickle.dumps(constraint)) == constraint


@pytest.mark.parametrize(
    "kind, value", [("json_schema", "{}"), ("regex", None), ("json_object", {}), ("xml", "")]
)
def test_a_constraint_of_the_wrong_shape_is_a_value_error(kind, value):
    with pytest.raises(ValueError):
        OutputConstraint(kind, value)
