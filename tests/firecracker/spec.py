"""Firecracker's API spec as JSON-schema validators of request bodies.

firecracker.yaml here is an unchanged copy of Firecracker's src/firecracker/swagger/firecracker.yaml
(API 1.17.0-dev, Apache-2.0: see FIRECRACKER-NOTICE). Swagger 2.0
definitions are JSON Schema draft 4 plus a few annotations the validator ignores. Firecracker's
parser also refuses fields it does not know (serde's deny_unknown_fields), which the spec does not
say, so every object definition is checked strictly here: a misspelt field fails the test.
"""

from __future__ import annotations

import copy
import re
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SPEC = Path(__file__).with_name("firecracker.yaml")


@cache
def load() -> dict[str, Any]:
    spec: dict[str, Any] = yaml.safe_load(SPEC.read_text())
    return spec


@cache
def _definitions() -> dict[str, Any]:
    definitions: dict[str, Any] = copy.deepcopy(load()["definitions"])
    for schema in definitions.values():
        if "properties" in schema:
            schema.setdefault("additionalProperties", False)
    return definitions


def operation(method: str, path: str) -> tuple[str, dict[str, Any]]:
    """The path template (e.g. /drives/{drive_id}) and operation that `method path` names."""
    for template, operations in load()["paths"].items():
        if re.fullmatch(re.sub(r"\{[^/]+\}", "[^/]+", template), path) and method.lower() in operations:
            return template, operations[method.lower()]
    raise KeyError(f"{method} {path} is not in the Firecracker API")


def body_errors(method: str, path: str, body: Any) -> list[str]:
    """What is wrong with `body` as the body of `method path`: empty when the spec accepts it. A path
    parameter (drive_id, iface_id) must equal the body's field of that name, as Firecracker checks."""
    template, op = operation(method, path)
    params = [p for p in op.get("parameters", []) if p["in"] == "body"]
    if not params:
        return [] if body is None else [f"{method} {path} takes no body"]
    schema = {**params[0]["schema"], "definitions": _definitions()}
    validator = jsonschema.Draft4Validator(schema)
    errors = [f"{'/'.join(map(str, e.path)) or 'body'}: {e.message}" for e in validator.iter_errors(body)]
    for name, value in zip(re.findall(r"\{([^/]+)\}", template), path.split("/")[2:], strict=False):
        if isinstance(body, dict) and body.get(name) != value:
            errors.append(f"{name} in the body is {body.get(name)!r}, the path says {value!r}")
    return errors


def response_codes(method: str, path: str) -> set[int | str]:
    """The status codes the spec lists for `method path` ("default" stands for any other)."""
    return set(operation(method, path)[1]["responses"])
