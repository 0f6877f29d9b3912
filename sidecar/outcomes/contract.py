"""The ``Outcome`` contract: the truth about one request, known later, on the outcomes topic.

A producer (the chargeback system, the click logger, the loan book) writes one record per
event it learns about, keyed as it likes (the stage repartitions them, see
:mod:`sidecar.outcomes.router`). Several outcomes per request are allowed; which one counts is
the rollout's ``combine`` rule (``last``: the latest by ``ts``, ties broken by the larger
label, then value; ``max``: the largest label, e.g. any chargeback marks a payment as fraud;
for item sets, ``last`` is the latest set and ``max`` the union of the sets).
Records are untrusted: :func:`decode_outcome` turns anything into an ``Outcome`` or a
dead-letter kind and reason, never an exception.
"""

from __future__ import annotations

import math
from typing import Annotated

import msgspec

from ..contracts import MIN_PLAUSIBLE_MS, DeadLetterKind, EpochMillis
from ..untrusted import error_text, try_decode

#: Major version of the outcome contract this build understands.
OUTCOME_SCHEMA_MAJOR = 1
#: Most item ids in a ranking label.
MAX_ITEMS = 1000
#: Largest ``value`` (the amount at stake). Costs and their squares are summed into window
#: accumulators that outcomes are added to and taken back from: one value near the float
#: maximum (1e308 is valid JSON) would make a window's and the rollout's verdict cost
#: figures infinite or NaN for good. 1e15 is more than any single amount in any currency's
#: minor unit.
MAX_VALUE = 1e15

ItemId = Annotated[str, msgspec.Meta(max_length=256)]


class Outcome(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What really happened to one request (Outcome v1).

    ``label``: ``true``/``false``, a number (positive when at least the rollout's
    ``positive_at_least``, 0.5 by default, so 0/1 work), or for ranking requests the item ids
    acted on (clicked, bought: a set, order and repeats do not matter), which judge both
    arms' item lists by CTR@k, NDCG@k and reciprocal rank. A label of the other kind (item
    ids for a binary request, a number for a ranking one) is counted as
    ``unsupported_labels``, not judged.
    """

    request_id: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    label: bool | float | Annotated[list[ItemId], msgspec.Meta(max_length=MAX_ITEMS)]
    #: When the outcome happened (epoch ms): a request's outcome counts when it happened
    #: within the rollout's label window after the request (``outcomes.quality``).
    ts: EpochMillis
    #: The amount at stake (e.g. the payment's amount); weights the cost of an error when
    #: ``cost_value`` says so. Must be finite, not negative and at most 1e15.
    value: Annotated[float, msgspec.Meta(ge=0, le=MAX_VALUE)] | None = None
    #: The request's routing key: needed to find its comparison when comparisons are keyed
    #: by routing key (``topics.comparisons_key = "routing_key"``).
    routing_key: Annotated[str, msgspec.Meta(max_length=1024)] | None = None
    #: Who said so (e.g. ``chargebacks``): kept for tracing, not interpreted.
    source: Annotated[str, msgspec.Meta(max_length=256)] | None = None
    schema_version: Annotated[str, msgspec.Meta(max_length=32)] = "1"


_DECODER = msgspec.json.Decoder(Outcome)
_ENCODER = msgspec.json.Encoder()


_CURRENT = str(OUTCOME_SCHEMA_MAJOR)  # what producers send: no parsing needed


def _major(version: str) -> int | None:
    head = version.split(".", 1)[0]
    return int(head) if head.isascii() and head.isdigit() and len(head) <= 4 else None


def decode_outcome(raw: bytes | None) -> Outcome | tuple[DeadLetterKind, str]:
    """The ``Outcome`` in ``raw``, or why it is none (a dead-letter kind and reason)."""
    result = try_decode(_DECODER.decode, raw)
    if isinstance(result, BaseException):
        kind: DeadLetterKind = "schema" if isinstance(result, msgspec.ValidationError) else "decode"
        return kind, f"not an Outcome: {error_text(result)}"
    version = result.schema_version
    if version != _CURRENT and _major(version) != OUTCOME_SCHEMA_MAJOR:
        return "schema_version", (
            f"outcome schema_version {result.schema_version[:32]!r} is not {OUTCOME_SCHEMA_MAJOR}.x"
        )
    label = result.label
    if isinstance(label, float) and not math.isfinite(label):
        return "schema", "outcome label is not a finite number"
    if result.value is not None and not math.isfinite(result.value):
        return "schema", "outcome value is not a finite number"
    return result


def encode_outcome(outcome: Outcome) -> bytes:
    return _ENCODER.encode(outcome)


def numeric_label(label: bool | float | list[str]) -> float | None:
    """The label as a number (``true`` is 1), or None for a ranking label."""
    if isinstance(label, list):
        return None
    return float(label)


__all__ = [
    "MAX_ITEMS",
    "MAX_VALUE",
    "MIN_PLAUSIBLE_MS",
    "OUTCOME_SCHEMA_MAJOR",
    "Outcome",
    "decode_outcome",
    "encode_outcome",
    "numeric_label",
]
