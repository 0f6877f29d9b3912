"""JSON Schema files for the wire contracts, generated from the msgspec Structs.

``sidecar schemas --write`` regenerates ``schemas/*.json`` (``sidecar/_schemas``, shipped as
package data; the top-level ``schemas`` is a link to it); ``sidecar schemas`` (and a test) fails
when a file is stale, so the published contracts never drift from the code.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import msgspec
import orjson

from .contracts import Comparison, DeadLetter, Decision, InferenceRequest

#: Every contract with a generated schema file, by file stem.
CONTRACTS: dict[str, type[msgspec.Struct]] = {
    "inference_request": InferenceRequest,
    "decision": Decision,
    "comparison": Comparison,
    "dead_letter": DeadLetter,
}


def _extra_contracts() -> dict[str, type[msgspec.Struct]]:
    """Contracts of the control plane, the aggregator and the outcomes stage, when those
    packages are present."""
    found: dict[str, type[msgspec.Struct]] = {}
    try:
        from .control import AuditRecord, ControlCommand, InstanceStatus

        found |= {
            "control_command": ControlCommand,
            "audit_record": AuditRecord,
            "instance_status": InstanceStatus,
        }
    except ImportError:
        pass
    try:
        from .aggregate import WindowReport
        from .aggregate.partials import WindowPartial

        found["window_report"] = WindowReport
        found["window_partial"] = WindowPartial
    except ImportError:
        pass
    try:
        from .outcomes.contract import Outcome
        from .outcomes.partials import MergedQualityWindow, QualityPartial
        from .outcomes.report import QualityReport, QualityVerdict

        found["outcome"] = Outcome
        found["quality_partial"] = QualityPartial
        found["merged_quality_window"] = MergedQualityWindow
        found["quality_report"] = QualityReport
        found["quality_verdict"] = QualityVerdict
    except ImportError:
        pass
    return found


def all_contracts() -> dict[str, type[msgspec.Struct]]:
    return CONTRACTS | _extra_contracts()


def _normalise_descriptions(node: Any) -> Any:
    """Every ``description`` dedented the way :func:`inspect.cleandoc` does.

    Older msgspec releases copy a docstring's indentation into the schema and 0.23 strips
    it; normalising here makes the generated files identical whichever msgspec is installed.
    """
    if isinstance(node, dict):
        return {
            k: inspect.cleandoc(v)
            if k == "description" and isinstance(v, str)
            else _normalise_descriptions(v)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_normalise_descriptions(v) for v in node]
    return node


def render(struct: type[msgspec.Struct]) -> bytes:
    schema = _normalise_descriptions(msgspec.json.schema(struct))
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}
    return orjson.dumps(schema, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"


def default_dir() -> Path:
    """The schema files shipped in the package (``sidecar/_schemas``, package data, so an
    installed wheel has them); the repository's top-level ``schemas/`` is a link to it."""
    return Path(__file__).resolve().parent / "_schemas"


def write(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, struct in all_contracts().items():
        path = directory / f"{stem}.json"
        path.write_bytes(render(struct))
        written.append(path)
    return written


def stale(directory: Path) -> list[str]:
    """Names of schema files that are missing or differ from the code."""
    problems = []
    for stem, struct in all_contracts().items():
        path = directory / f"{stem}.json"
        if not path.exists():
            problems.append(f"{path} is missing")
        elif path.read_bytes() != render(struct):
            problems.append(f"{path} is stale")
    return problems
