"""The planner's published JSON Schemas, generated from the models; the files in
``mlopt/plan/schemas/`` are these, and a test keeps them equal (regenerate with
``python -m mlopt.plan.schemas``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlopt.plan.inputs import FLEET_SCHEMA_VERSION, INPUT_SCHEMA_VERSION, Fleet, Traffic
from mlopt.plan.result import plan_schema

SCHEMA_DIR = Path(__file__).with_name("schemas")


def _schema(model: type, name: str, version: str) -> dict[str, Any]:
    schema = model.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = f"https://mlopt.dev/schemas/{name}-{version}.json"
    return schema


def schemas() -> dict[str, dict[str, Any]]:
    """File name -> JSON Schema, for fleet.yaml, traffic.yaml and the plan."""
    return {"fleet.schema.json": _schema(Fleet, "fleet", FLEET_SCHEMA_VERSION),
            "traffic.schema.json": _schema(Traffic, "traffic", INPUT_SCHEMA_VERSION),
            "plan.schema.json": plan_schema()}


def write_schemas(folder: Path = SCHEMA_DIR) -> list[Path]:
    """Write the schema files (what ships in the package)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, schema in schemas().items():
        (folder / name).write_text(json.dumps(schema, indent=2) + "\n")
        paths.append(folder / name)
    return paths


if __name__ == "__main__":
    for p in write_schemas():
        print(p)
