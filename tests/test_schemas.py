from __future__ import annotations

import json
from pathlib import Path

import msgspec

from sidecar import schemas
from sidecar.contracts import InferenceRequest


def test_schema_files_match_the_contracts_in_the_code() -> None:
    problems = schemas.stale(schemas.default_dir())
    assert not problems, f"{problems}: run `sidecar schemas --write`"


def test_a_changed_contract_is_detected(tmp_path: Path) -> None:
    schemas.write(tmp_path)
    path = tmp_path / "decision.json"
    doc = json.loads(path.read_text())
    doc["$defs"]["Decision"]["properties"].pop("arm")
    path.write_text(json.dumps(doc))
    assert schemas.stale(tmp_path) == [f"{path} is stale"]


def test_request_schema_says_what_is_required() -> None:
    doc = json.loads((schemas.default_dir() / "inference_request.json").read_text())
    request = doc["$defs"]["InferenceRequest"]
    assert set(request["required"]) == {"request_id", "features"}
    assert msgspec.json.decode(b'{"request_id":"a","features":{}}', type=InferenceRequest)


class _Indented(msgspec.Struct):
    """First line.

    An indented second paragraph, as every multi-line docstring in the code has.
    """

    x: int


def test_descriptions_are_dedented_whatever_msgspec_does() -> None:
    # msgspec < 0.23 keeps the docstring's indentation and 0.23 strips it; the committed
    # files must not depend on which one an install resolved to.
    doc = json.loads(schemas.render(_Indented))
    assert doc["$defs"]["_Indented"]["description"] == (
        "First line.\n\nAn indented second paragraph, as every multi-line docstring in the "
        "code has."
    )
