"""config/README.md is generated from the schema: it must be current, and the generator must show every key."""
from pathlib import Path

from semalign.suite.configdoc import render, rows

REPO = Path(__file__).resolve().parents[1]


def test_config_readme_is_current():
    """Fails when the schema changed without `python -m semalign.suite.configdoc > config/README.md`."""
    assert (REPO / "config" / "README.md").read_text() == render()


def test_rows_resolve_refs_mappings_defaults_and_required():
    schema = {
        "definitions": {"size": {"type": "object", "description": "sizes", "required": ["n"],
                                 "properties": {"n": {"type": "integer", "minimum": 1, "description": "count"}}}},
        "required": ["a"],
        "properties": {
            "a": {"type": "string", "description": "first"},
            "b": {"type": ["integer", "null"], "default": None, "description": "x | y"},
            "m": {"type": "object", "additionalProperties": {"$ref": "#/definitions/size"}},
        },
    }
    assert rows(schema, "", schema["definitions"]) == [
        "| `a` | string | required | first |",
        "| `b` | integer or null | null | x \\| y |",
        "| `m` | object | – |  |",
        "| `m.<name>` | object | – | sizes |",
        "| `m.<name>.n` | integer (>= 1) | required | count |",
    ]


def test_schema_nodes_hold_only_json_schema_keywords():
    """A comma inside an unquoted flow-mapping description splits it into a junk key (the batch_size description
    once read "(MMLU" and the rest became a key); every schema node must use JSON-schema keywords only."""
    import yaml

    keywords = {"type", "description", "default", "properties", "additionalProperties", "required", "items", "enum",
                "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minItems", "maxItems", "minProperties",
                "uniqueItems", "oneOf", "anyOf", "$ref", "$schema", "definitions", "pattern", "propertyNames",
                "minLength", "const", "not", "allOf", "title", "format"}

    def nodes(node: dict, path: str):
        yield path, node
        for key, child in node.get("properties", {}).items():
            yield from nodes(child, f"{path}.{key}")
        for key, child in node.get("definitions", {}).items():
            yield from nodes(child, f"{path}#{key}")
        for sub in ("items", "additionalProperties"):
            if isinstance(node.get(sub), dict):
                yield from nodes(node[sub], f"{path}[{sub}]")
        for i, alt in enumerate(node.get("oneOf", []) + node.get("anyOf", [])):
            yield from nodes(alt, f"{path}|{i}")

    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    junk = {path: sorted(set(node) - keywords) for path, node in nodes(schema, "") if set(node) - keywords}
    assert not junk
