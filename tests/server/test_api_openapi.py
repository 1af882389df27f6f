"""``/openapi.json`` says exactly what each route accepts: requests generated from the schema are
served (200), and every bound the schema publishes is the server's own (just past it: 400 naming
the field)."""

from __future__ import annotations

import json
import random
from typing import Any

import jsonschema
import pytest
from api_helpers import app_client, assert_openai_error
from fake_engine import FakeEngine

pytestmark = pytest.mark.anyio

ROUTES = {
    "/v1/chat/completions": "ChatCompletionRequest",
    "/v1/completions": "CompletionRequest",
    "/generate": "TgiRequest",
    "/generate_stream": "TgiRequest",
    "/": "TgiCompatRequest",
}
# The one rule a JSON schema cannot state: the prompt's tokens plus these must fit the context.
LENGTH_PARAMS = {"max_tokens", "max_completion_tokens", "parameters.max_new_tokens"}


class SchemaExamples:
    """Random instances of a JSON schema (the subset /openapi.json uses), short strings only."""

    def __init__(self, openapi: dict[str, Any], rng: random.Random) -> None:
        self.components = openapi["components"]["schemas"]
        self.rng = rng

    def example(self, schema: dict[str, Any]) -> Any:
        rng = self.rng
        if "$ref" in schema:
            return self.example(self.components[schema["$ref"].rsplit("/", 1)[-1]])
        if "anyOf" in schema:
            return self.example(rng.choice(schema["anyOf"]))
        if "enum" in schema:
            return rng.choice(schema["enum"])
        if "const" in schema:
            return schema["const"]
        kind = schema.get("type")
        if kind == "object" or "properties" in schema:
            required = set(schema.get("required", ()))
            while True:
                instance = {
                    name: self.example(sub)
                    for name, sub in schema.get("properties", {}).items()
                    if name in required or rng.random() < 0.5
                }
                nots = [schema["not"]] if "not" in schema else []
                nots += [clause["not"] for clause in schema.get("allOf", ()) if "not" in clause]
                if not any(_matches_not(instance, clause) for clause in nots):
                    return instance
        if kind == "array":
            low, high = schema.get("minItems", 0), min(schema.get("maxItems", 3), 3)
            return [self.example(schema["items"]) for _ in range(rng.randint(low, max(low, high)))]
        if kind == "string":
            return "".join(rng.choice("ab c\n") for _ in range(rng.randint(schema.get("minLength", 0), 6)))
        if kind == "integer":
            low = schema.get("minimum", -5)
            high = schema.get("maximum", low + 50)
            return rng.choice([low, high, rng.randint(low, min(high, low + 50))])
        if kind == "number":
            low = schema.get("minimum", schema.get("exclusiveMinimum", 0.0))
            high = schema.get("maximum", low + 5.0)
            value = rng.choice([low, high, rng.uniform(low, high)])
            return value if value != schema.get("exclusiveMinimum") else high
        if kind == "boolean":
            return rng.random() < 0.5
        return None


async def test_schema_generated_requests_are_served():
    async with app_client(FakeEngine()) as client:
        openapi = (await client.get("/openapi.json")).json()
        examples = SchemaExamples(openapi, random.Random(7))
        for path, model in ROUTES.items():
            assert "422" not in json.dumps(openapi["paths"][path]["post"]["responses"])
            for _ in range(60):
                body = examples.example({"$ref": f"#/components/schemas/{model}"})
                response = await client.post(path, json=body)
                if response.status_code == 400 and response.json()["error"]["param"] in LENGTH_PARAMS:
                    assert "context" in response.json()["error"]["message"]
                    continue
                assert response.status_code == 200, (path, body, response.text)


def _matches_not(instance: dict[str, Any], schema: dict[str, Any]) -> bool:
    """Whether ``instance`` matches a ``not`` clause (then the server refuses it)."""
    return jsonschema.Draft202012Validator(schema).is_valid(instance)


def _bounded_fields(openapi: dict[str, Any], model: str, prefix: str = ""):
    for name, schema in openapi["components"]["schemas"][model]["properties"].items():
        for option in schema.get("anyOf", [schema]):
            if "$ref" in option and option["$ref"].endswith("TgiParameters"):
                yield from _bounded_fields(openapi, "TgiParameters", "parameters.")
            for bound, step in (("minimum", -1), ("exclusiveMinimum", 0), ("maximum", 1)):
                if bound in option:
                    yield prefix + name, option["type"], option[bound], step


async def test_every_published_bound_is_the_servers():
    async with app_client(FakeEngine()) as client:
        openapi = (await client.get("/openapi.json")).json()
        base = {"/v1/completions": {"prompt": "a"}, "/generate": {"inputs": "a"}}
        checked = set()
        for path, body in base.items():
            for field, kind, bound, step in _bounded_fields(openapi, ROUTES[path]):
                outside = bound + step * (1 if kind == "integer" else 1e-9 * max(1.0, abs(bound)))
                request = json.loads(json.dumps(body))
                target, key = (
                    (request.setdefault("parameters", {}), field[11:]) if "." in field else (request, field)
                )
                target[key] = outside
                assert_openai_error(await client.post(path, json=request), 400, field)
                checked.add(field)
        assert {"seed", "repetition_penalty", "top_p", "parameters.seed", "max_tokens"} <= checked


async def test_an_empty_prompt_is_outside_the_schema_and_refused():
    async with app_client(FakeEngine()) as client:
        openapi = (await client.get("/openapi.json")).json()
        schemas = openapi["components"]["schemas"]
        assert schemas["TgiRequest"]["properties"]["inputs"]["minLength"] == 1
        text, text_list, _, _ = schemas["CompletionRequest"]["properties"]["prompt"]["anyOf"]
        assert text["minLength"] == 1 and text_list["items"]["minLength"] == 1
        for path, body, param in (
            ("/v1/completions", {"prompt": ""}, "prompt"),
            ("/v1/completions", {"prompt": [""]}, "prompt"),
            ("/generate", {"inputs": ""}, "inputs"),
        ):
            assert_openai_error(await client.post(path, json=body), 400, param)
