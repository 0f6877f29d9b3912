"""JSON Schemas of a config's output versions: ``decision.<version>.json`` per version.

The current version's is the Decision's own; an older version's is derived from it by its
declarative adapter, or generated from the Struct its callable returns. ``sidecar schemas
--config FILE`` checks the files in ``outputs.schema_dir`` (``--write`` regenerates them),
like the package's own schemas.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import orjson

from ..config import SidecarConfig
from ..contracts import Decision
from .adapters import compile_adapter


def _normalised(doc: Any) -> Any:
    from ..schemas import _normalise_descriptions

    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        **_normalise_descriptions(doc),
    }


def version_schemas(cfg: SidecarConfig) -> dict[str, dict[str, Any]]:
    """Each output version's JSON Schema document, the current one first."""
    out: dict[str, dict[str, Any]] = {}
    if cfg.outputs.api_version is not None:
        out[cfg.outputs.api_version] = _normalised(msgspec.json.schema(Decision))
    for spec in cfg.outputs.versions:
        out[spec.version] = _normalised(compile_adapter(spec).schema())
    return out


def render(doc: dict[str, Any]) -> bytes:
    return orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"


def schema_files(cfg: SidecarConfig, directory: Path | None = None) -> dict[Path, bytes]:
    where = Path(cfg.outputs.schema_dir) if directory is None else directory
    return {
        where / f"decision.{version}.json": render(doc)
        for version, doc in version_schemas(cfg).items()
    }


def write(cfg: SidecarConfig, directory: Path | None = None) -> list[Path]:
    written = []
    for path, data in schema_files(cfg, directory).items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        written.append(path)
    return written


def stale(cfg: SidecarConfig, directory: Path | None = None) -> list[str]:
    problems = []
    for path, data in schema_files(cfg, directory).items():
        if not path.exists():
            problems.append(f"{path} is missing")
        elif path.read_bytes() != data:
            problems.append(f"{path} is stale")
    return problems
