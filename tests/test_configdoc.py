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
