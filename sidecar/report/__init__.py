"""``sidecar report``: one self-contained HTML page explaining a rollout to an analyst.

Input: the reports, control and audit topics (from a broker, between two times) or a recorded
JSONL file of them (``sidecar demo`` writes one). Output: decision rates, the ratio against its
guard, drift, latency, disagreement, errors and the routing share over time, every control
command marked on the time axis, and the evidence behind every command the aggregator issued.
"""

from __future__ import annotations

from .model import Recording, command_timeline, decode_jsonl, encode_jsonl, read_jsonl, write_jsonl
from .page import build_charts, render_page

__all__ = [
    "Recording",
    "build_charts",
    "command_timeline",
    "decode_jsonl",
    "encode_jsonl",
    "read_jsonl",
    "render_page",
    "write_jsonl",
]
