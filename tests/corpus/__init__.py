"""Committed hostile inputs (hostile_options.json, hostile_payloads.json) and their loader.

JSON cannot hold megabyte strings readably, so {"__repeat__": [text, n]} stands for text * n."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

_HERE = Path(__file__).parent
DELETE = "__delete__"


def _expand(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__repeat__"}:
            text, count = value["__repeat__"]
            return text * count
        return {key: _expand(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_expand(item) for item in value]
    return value


def load(name: str) -> dict[str, Any]:
    return json.loads((_HERE / name).read_text(encoding="ascii"))


def cases(name: str) -> list[dict[str, Any]]:
    """The cases of a corpus file, expanded; payload patches are applied to the file's base payload."""
    corpus = load(name)
    expanded = []
    for raw in corpus["cases"]:
        case = _expand(raw)
        if "patch" in case:
            payload = copy.deepcopy(corpus["base"])
            for key, value in case.pop("patch").items():
                if value == DELETE:
                    del payload[key]
                else:
                    payload[key] = value
            case["input"] = payload
        expanded.append(case)
    return expanded
