"""Structured output: a JSON schema becomes a grammar by llama.cpp's own converter."""
from __future__ import annotations

import json
from typing import Any

import pytest

import lamina

jsonschema = pytest.importorskip("jsonschema")

pytestmark = pytest.mark.timeout(300)

# bounded (string lengths, item counts, integer range) so that every generation ends
PERSON: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        "kind": {"enum": ["cat", "dog", "person"]},
    },
    "required": ["name", "age", "kind"],
    "additionalProperties": False,
}


def test_fifty_sampled_generations_of_the_real_model_validate(real_model: lamina.Model) -> None:
    """Temperature 1, seeds 0..49: every output parses and validates against the schema."""
    with real_model.context(n_ctx=1024) as ctx:
        for seed in range(50):
            c = ctx.complete("Describe a pet as JSON:\n", max_tokens=160, json_schema=PERSON,
                             sampler=lamina.Sampler(temperature=1.0, seed=seed))
            assert c.finish_reason == "stop", (seed, c.text)
            jsonschema.validate(json.loads(c.text), PERSON)


def test_response_format_json_object_gives_a_json_object(real_model: lamina.Model) -> None:
    with real_model.context(n_ctx=1024) as ctx:
        for seed in range(3):
            c = ctx.complete("A JSON object describing Paris:\n", max_tokens=200,
                             response_format={"type": "json_object"}, sampler=lamina.Sampler(temperature=0.7, seed=seed))
            if c.finish_reason == "stop":  # an object may be longer than max_tokens: then it is cut
                assert isinstance(json.loads(c.text), dict), c.text
        schema = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}
        c = ctx.complete("A person as JSON:\n", max_tokens=160, response_format=schema)
        jsonschema.validate(json.loads(c.text), PERSON)


# no free text: random weights emit byte tokens, whose broken UTF-8 a string's length cannot count
RECORD: dict[str, Any] = {
    "type": "object",
    "properties": {"kind": {"enum": ["cat", "dog"]}, "age": {"type": "integer", "minimum": 0, "maximum": 99},
                   "ok": {"type": "boolean"}, "ids": {"type": "array", "items": {"enum": [1, 2, 3]}, "maxItems": 4}},
    "required": ["kind", "age", "ok"],
    "additionalProperties": False,
}


def test_the_tiny_model_is_held_to_the_schema(tiny_model: lamina.Model) -> None:
    """Random weights want any token; the grammar leaves only those the schema allows."""
    with tiny_model.context(n_ctx=512) as ctx:
        for seed in range(5):
            c = ctx.complete("x", max_tokens=200, json_schema=json.dumps(RECORD),
                             sampler=lamina.Sampler(temperature=1.0, seed=seed))
            assert c.finish_reason == "stop", c.text
            jsonschema.validate(json.loads(c.text), RECORD)
        greedy = ctx.complete("x", max_tokens=200, sampler=lamina.Sampler(json_schema=RECORD))
        jsonschema.validate(json.loads(greedy.text), RECORD)


@pytest.mark.parametrize("schema, part", [
    ({"type": "object", "properties": {"a": {"type": "frobnicate"}}}, "#/properties/a"),
    ({"properties": {"a": {"$ref": "#/definitions/missing"}}}, "#/properties/a"),
])
def test_an_invalid_schema_raises_naming_the_part(tiny_model: lamina.Model, schema: dict[str, Any], part: str) -> None:
    with pytest.raises(ValueError, match=part):
        lamina.Sampler(json_schema=schema)
    with tiny_model.context(n_ctx=256) as ctx:
        with pytest.raises(ValueError, match=part):
            ctx.generate("x", json_schema=schema)


def test_misuse(tiny_model: lamina.Model) -> None:
    with pytest.raises(ValueError, match="not valid JSON"):
        lamina.Sampler(json_schema="{not json")
    with pytest.raises(ValueError, match="not both"):
        lamina.Sampler(grammar='root ::= "a"', json_schema=PERSON)
    with pytest.raises(TypeError):
        lamina.Sampler(json_schema=42)  # type: ignore[arg-type]
    with tiny_model.context(n_ctx=256) as ctx:
        with pytest.raises(ValueError, match="not both"):
            ctx.generate("x", json_schema=PERSON, response_format={"type": "json_object"})
        with pytest.raises(ValueError, match="grammar already"):
            ctx.generate("x", json_schema=PERSON, sampler=lamina.Sampler(grammar='root ::= "a"'))
        with pytest.raises(ValueError, match="response_format type"):
            ctx.generate("x", response_format={"type": "yaml"})
        with pytest.raises(ValueError, match="json_schema"):
            ctx.generate("x", response_format={"type": "json_schema"})
        assert ctx.complete("x", max_tokens=3, response_format={"type": "text"}, ignore_eos=True).tokens.size == 3
