"""The language-neutral contracts in the project's schemas/ folder, loaded by name."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"


@lru_cache(maxsize=None)
def schema(name: str) -> dict:
    """A JSON schema by file stem, e.g. schema("job") reads schemas/job.schema.json."""
    return json.loads((SCHEMA_DIR / f"{name}.schema.json").read_text())


@lru_cache(maxsize=None)
def arrow_description(name: str) -> dict:
    """A token shard description by file stem, e.g. "image_tokens" reads schemas/image_tokens.arrow.json."""
    return json.loads((SCHEMA_DIR / f"{name}.arrow.json").read_text())
