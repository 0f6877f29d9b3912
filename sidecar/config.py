"""Configuration: typed msgspec Structs, loaded from TOML and overridden by the environment.

Precedence (highest first): environment variables, the TOML file, the defaults below.

* ``KAFKA_BOOTSTRAP_SERVERS`` sets ``kafka.bootstrap_servers``.
* ``SIDECAR_<SECTION>__<KEY>`` sets any scalar setting, e.g. ``SIDECAR_KAFKA__GROUP_ID=fraud``,
  ``SIDECAR_ROLLOUT__MODE=canary``, ``SIDECAR_MODELS__CANDIDATE__TIMEOUT_MS=50``. Values are
  converted to the setting's type (``"50"`` -> 50, ``"true"`` -> True).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from .aggregate.settings import AggregateSettings
from .config_hints import LIST_HINT, check_env_path, closest, explain, is_text_setting
from .errors import ConfigError
from .manifest import ItemsFrom, Manifest, OutputKind, output_shape_problem
from .outcomes.settings import OutcomesSettings
from .outputs.settings import OutputsSettings
from .registry import RegistrySettings
from .routing import Mode

Meta = msgspec.Meta


class KafkaConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """How to reach the brokers. TLS/SASL settings pass through to aiokafka."""

    bootstrap_servers: str = "127.0.0.1:9092"
    group_id: str = "sidecar"
    client_id: str = "sidecar"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_plain_username: str | None = None
    sasl_plain_password: str | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    #: Producer durability. ``all`` waits for every in-sync replica: the only safe choice when
    #: offsets are committed after acknowledgement.
    acks: Literal["all", "1", "0"] = "all"
    linger_ms: Annotated[int, Meta(ge=0)] = 5
    #: What this process's producers compress with; records of every codec are read
    #: whatever it says. ``none`` lets output batches be built whole in C (the fastest).
    compression_type: Literal["none", "gzip", "snappy", "lz4", "zstd"] = "none"
    session_timeout_ms: Annotated[int, Meta(ge=1000)] = 10_000
    heartbeat_interval_ms: Annotated[int, Meta(ge=100)] = 3_000
    max_poll_interval_ms: Annotated[int, Meta(ge=1000)] = 300_000
    request_timeout_ms: Annotated[int, Meta(ge=1000)] = 30_000
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    #: Longest the broker holds a fetch of requests that finds no new data. Apache Kafka
    #: answers as soon as a record arrives; some compatible brokers (Tansu, the embedded one)
    #: answer only at this deadline, which then adds up to this much to every decision
    #: (aiokafka's default, 500, measured 120 ms median at 2k req/s; 50 gives 18 ms). An
    #: idle instance sends about 1000/this fetches a second.
    fetch_max_wait_ms: Annotated[int, Meta(ge=1, le=5000)] = 50
    #: How often clients refresh topic metadata: how soon new partitions are seen (by the
    #: outcomes stage, which stops when the comparisons topic's partition count changes).
    metadata_max_age_ms: Annotated[int, Meta(ge=1000)] = 300_000
    #: How long to keep retrying an unreachable broker at start-up (0 = forever).
    connect_timeout_s: Annotated[float, Meta(ge=0)] = 0.0
    #: Largest record (key, value and headers) produced. Lowered at start-up to what each
    #: output topic's ``max.message.bytes`` allows, when the broker says. An output larger
    #: than this is not sent: its request becomes a dead letter (``output_oversize``).
    max_record_bytes: Annotated[int, Meta(ge=16_384)] = 1_000_000

    def __repr__(self) -> str:
        """Never show the SASL password (configs end up in logs and tracebacks)."""
        fields = ", ".join(
            f"{name}={'***' if name == 'sasl_plain_password' and value else value!r}"
            for name, value in ((f, getattr(self, f)) for f in self.__struct_fields__)
        )
        return f"KafkaConfig({fields})"


class TopicsConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    requests: str = "inference.requests"
    decisions: str = "inference.decisions"
    comparisons: str = "inference.comparisons"
    dead_letter: str = "inference.dead-letter"
    control: str = "sidecar.control"
    #: Key of comparison records. ``rollout``: one rollout's comparisons on one partition, one
    #: aggregator sees them all (simplest; one process per rollout). ``routing_key``: spread
    #: over every partition, aggregated per partition by any number of aggregator instances
    #: and merged per rollout (``aggregate.partials_topic``).
    comparisons_key: Literal["rollout", "routing_key"] = "rollout"
    #: Partitions used when ``sidecar broker`` (or ``--create-topics``) creates the topics.
    partitions: Annotated[int, Meta(ge=1)] = 6
    replication_factor: Annotated[int, Meta(ge=1)] = 1


class InputConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    format: Literal["json", "msgpack"] = "json"
    #: Records larger than this go to the dead-letter topic as ``oversize``.
    max_message_bytes: Annotated[int, Meta(ge=64)] = 1_048_576


class DeadLetterConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What a dead letter keeps of the record it stands for (``topics.dead_letter``)."""

    #: Original keys and values up to this size are kept whole; a larger one is kept as a
    #: prefix of this size plus its size and sha256 (the original stays in its source topic).
    #: Dead letters carry bytes as base64 (4/3 the size), so the default stays well under the
    #: 1 MiB a Kafka topic takes by default.
    max_value_bytes: Annotated[int, Meta(ge=0)] = 262_144
    #: The original record's headers are kept (in order) up to this many bytes of names and
    #: base64 values; the rest are left out and the dead letter says so. Headers are
    #: attacker-controlled: this bounds what they add to a dead letter.
    max_header_bytes: Annotated[int, Meta(ge=0, le=262_144)] = 16_384


class PipelineConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    #: Most records taken from Kafka per batch (``getmany(max_records=...)``).
    max_batch: Annotated[int, Meta(ge=1)] = 2_000
    #: Bound on consumed records not yet committed: outputs not all acknowledged, or waiting
    #: for the candidate or behind an earlier batch that does (commits go in order).
    #: Consumption pauses (backpressure) at this bound; it also bounds what a crash repeats.
    #: A candidate that times out holds everything consumed meanwhile: keep it above the
    #: request rate times the candidate's ``timeout_ms``, plus ``max_sending_records``.
    max_in_flight_records: Annotated[int, Meta(ge=1)] = 32_000
    #: Bound on consumed records whose outputs are on their way to the broker (queued in the
    #: producer or not yet acknowledged), not counting batches that wait only for the
    #: candidate or for their turn to commit. What a busy instance holds in memory: when the
    #: producer is the bottleneck, consumption pauses here, long before
    #: ``max_in_flight_records``, which is left for a slow candidate's backlog.
    max_sending_records: Annotated[int, Meta(ge=1)] = 8_000
    fetch_timeout_ms: Annotated[int, Meta(ge=1)] = 100
    #: Seconds to wait for in-flight outputs on shutdown or rebalance before giving up.
    drain_timeout_s: Annotated[float, Meta(gt=0)] = 30.0
    #: Batches whose champion decisions are out and that wait for the candidate (its lane).
    #: Past this the candidate is not asked for the next batch (``shed``), so a slow or hung
    #: candidate costs comparisons, never champion latency or throughput.
    candidate_backlog: Annotated[int, Meta(ge=1)] = 8


FeatureType = Literal["number", "integer", "bool", "category"]


class FeatureSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One model input: its name in ``InferenceRequest.features`` and its type."""

    name: Annotated[str, Meta(min_length=1)]
    type: FeatureType = "number"
    #: ``null`` is accepted (and becomes NaN) only when nullable.
    nullable: bool = False
    #: For ``category``: the known values, encoded as their index; unknown values become -1.
    categories: list[str] | None = None


class BreakerConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Circuit breaker of one model (``sidecar.models.health``)."""

    #: On by default: a model that fails half of its last 20 calls (5 at least) is not
    #: called for 5 s, then probed; a failing candidate then costs nothing (not even a
    #: timeout per batch), and a failing champion's records go straight to
    #: ``rollout.champion_failure`` instead of waiting for a timeout each.
    enabled: bool = True
    #: Share of failed calls in the window that opens the breaker.
    failure_rate: Annotated[float, Meta(gt=0, le=1)] = 0.5
    #: Calls remembered.
    window: Annotated[int, Meta(ge=1)] = 20
    #: Fewer calls than this in the window never open the breaker.
    min_calls: Annotated[int, Meta(ge=1)] = 5
    #: Seconds the breaker stays open before a half-open probe.
    open_s: Annotated[float, Meta(gt=0)] = 5.0


class ModelConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A model declared in config. ``threshold`` is per model: downstream systems are tuned
    to a decision rate, and a new model at the old threshold is the failure this guards."""

    name: Annotated[str, Meta(min_length=1)]
    version: Annotated[str, Meta(pattern=r"^\d+\.\d+\.\d+([-+].*)?$")]
    #: ``python`` (in-process threads), ``process`` (the same factory in worker processes),
    #: ``http`` (an Open Inference Protocol / KServe V2 server at ``url``), ``onnx``
    #: (onnxruntime, extra ``sidecar[onnx]``) or ``mlflow`` (a registered pyfunc model, extra
    #: ``sidecar[mlflow]``); see the README's Models section.
    loader: Literal["python", "process", "http", "onnx", "mlflow"] = "python"
    #: ``python``/``process``: ``package.module:factory``; the factory returns an object with
    #: ``predict(batch: numpy.ndarray) -> numpy.ndarray`` of scores. ``http``: the model's
    #: name on the server. ``onnx``: the ``.onnx`` file. ``mlflow``: ``models:/NAME@ALIAS``
    #: or ``models:/NAME/VERSION``, resolved to one registry version at start-up.
    target: str
    #: ``http``: the server's base URL, e.g. ``http://127.0.0.1:8080``.
    url: str | None = None
    #: ``mlflow``: tracking (and model registry) URI, e.g. ``http://mlflow:5000`` or
    #: ``sqlite:///mlflow.db``; unset: ``$MLFLOW_TRACKING_URI`` (``$MLFLOW_REGISTRY_URI``
    #: overrides the registry).
    mlflow_tracking_uri: str | None = None
    #: Keyword arguments passed to the factory.
    options: dict[str, Any] = {}
    features: list[FeatureSpec]
    #: Binary models: the decision is ``score >= threshold``.
    threshold: float = 0.5
    #: What the model returns: ``binary`` (a score per request, decided by ``threshold``),
    #: ``multiclass`` (a probability per ``labels`` entry; the decision is a label),
    #: ``regression`` (a number; ``bands`` make an optional decision) or ``ranking`` (the
    #: top ``k`` item ids with scores). ``multiclass`` and ``ranking`` need the ``python``
    #: loader; see the README's "Output kinds".
    output_kind: OutputKind = "binary"
    #: ``multiclass``: the class labels, in the order of the model's probability columns.
    #: ``regression`` with ``bands``: the band names (one more than cut points).
    labels: list[str] | None = None
    #: ``regression``: ascending cut points; the decision is the band the value falls in.
    bands: list[float] | None = None
    #: ``ranking``: the number of items returned per request.
    k: Annotated[int, Meta(ge=1, le=1000)] | None = None
    #: ``ranking``: ``model`` (the model picks from its own catalogue) or ``request`` (a
    #: re-ranker: it scores the request's ``candidates``).
    items_from: ItemsFrom = "model"
    timeout_ms: Annotated[int, Meta(gt=0)] = 200
    #: Batches scored concurrently by this model (threads off the event loop).
    concurrency: Annotated[int, Meta(ge=1)] = 1
    #: Most records per model call; larger batches are split (0: no limit).
    max_batch: Annotated[int, Meta(ge=0)] = 0
    #: The model's contract inline (see ``sidecar.manifest.Manifest``); or ``manifest_file``.
    #: Without either, one is derived from the fields above.
    manifest: Manifest | None = None
    #: Path of a TOML or JSON manifest file (relative to the working directory). Without
    #: ``manifest`` or ``manifest_file``, a manifest beside the model file is used when one
    #: names this model: ``<model file stem>.manifest.toml``, then ``manifest.toml`` in the
    #: same folder (model file: the ``.onnx`` file, or the ``python``/``process`` module).
    manifest_file: str | None = None
    #: Candidate only: may break the request or output contract because it only ever runs in
    #: shadow (the sidecar then refuses any other mode and never lets it decide).
    shadow_only: bool = False
    breaker: BreakerConfig = msgspec.field(default_factory=BreakerConfig)


class ModelsConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    champion: ModelConfig
    candidate: ModelConfig | None = None


class RequestContractConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What upstream producers declare they send; the start-up gate checks models against it."""

    #: Feature names every request carries (unset: the feature gate is off).
    features: list[str] | None = None
    #: Whether requests carry ``candidates`` (item ids a re-ranker orders). ``false``: a
    #: model with ``items_from = "request"`` is refused at start-up; unset: not checked.
    candidates: bool | None = None
    #: ``count``: values outside a manifest's ranges are counted per feature; ``strict``: also
    #: dead-letter records outside the champion's ranges (kind ``out_of_range``).
    validation: Literal["count", "strict"] = "count"


ChampionFailurePolicy = Literal["fallback_candidate", "default_decision", "dead_letter"]


class RolloutConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The rollout and the routing policy it starts with (epoch 0) before any control command."""

    name: Annotated[str, Meta(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")] = "default"
    mode: Mode = Mode.SHADOW
    canary_share_bp: Annotated[int, Meta(ge=0, le=10_000)] = 0
    #: Score the arm that does not decide (on by default: the comparison needs both).
    score_shadow_arm: bool = True
    #: What to do when the champion fails on a record the champion should decide.
    champion_failure: ChampionFailurePolicy = "fallback_candidate"
    default_score: float = 0.0
    default_decision: bool = False


class MetricsConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    #: Port of ``/metrics``, ``/healthz`` and ``/readyz`` (0 disables them).
    port: Annotated[int, Meta(ge=0, le=65535)] = 9100
    #: Address they listen on: loopback by default, like everything else; ``0.0.0.0`` in a
    #: container so Prometheus and the orchestrator's probes can reach them.
    host: str = "127.0.0.1"


class LoggingConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"
    #: ``sidecar run`` logs a progress line this often (records/s, lag, dead letters, mode,
    #: epoch); 0 turns it off.
    progress_interval_s: Annotated[float, Meta(ge=0)] = 10.0


class TracingConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """OpenTelemetry spans: one per batch (consume, score, produce, commit) and one per control
    command (``sidecar.tracing``). Needs the ``otel`` extra: ``pip install 'sidecar[otel]'``."""

    #: Off by default; off, OpenTelemetry is never imported and a batch costs nothing more.
    enabled: bool = False
    #: ``otlp`` (OTLP over HTTP/protobuf to ``endpoint``), ``console`` (JSON on stdout, for
    #: debugging) or ``none`` (spans are made but sent nowhere: measures their cost).
    exporter: Literal["otlp", "console", "none"] = "otlp"
    #: Base URL of the OTLP/HTTP collector (spans go to ``<endpoint>/v1/traces``). Unset:
    #: the standard ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_ENDPOINT``
    #: variables, else ``http://localhost:4318``.
    endpoint: str | None = None
    #: ``service.name`` of the spans. Unset: ``$OTEL_SERVICE_NAME``, else ``sidecar``.
    service_name: str | None = None
    #: Share of batches traced (decided per batch; a batch not traced costs one random
    #: number). Control commands are always traced.
    sample_ratio: Annotated[float, Meta(ge=0, le=1)] = 1.0
    #: Most span links from a batch span to the traces of its requests (W3C ``traceparent``
    #: headers), the first ones of the batch; the count of all is an attribute.
    max_links: Annotated[int, Meta(ge=0, le=128)] = 32


class ControlSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The control plane (``sidecar.control.plane``): signed commands on ``topics.control``.

    Every instance must run with the same ``max_command_*`` and ``min_promoted_age_s`` values,
    or replays of the control topic may diverge between instances.
    """

    enabled: bool = True
    #: Trust file: the public keys that may sign commands, their roles and validity (TOML,
    #: see ``sidecar ctl keygen``). Unset: every command is refused (fail closed).
    trust_file: str | None = None
    #: This instance's private key (role ``sidecar``): signs its ramp ``advance`` commands,
    #: heartbeats and audit records. Unset: it never advances a ramp, and ``sidecar ctl`` shows
    #: its heartbeats as unverified (and cannot wait for it).
    signing_key_file: str | None = None
    #: Heartbeats (InstanceStatus), keyed by instance id. Default: ``<topics.control>.status``.
    status_topic: str | None = None
    #: Outcome of every control record on every instance. Default: ``<topics.control>.audit``.
    audit_topic: str | None = None
    heartbeat_interval_s: Annotated[float, Meta(gt=0)] = 2.0
    #: How often a ramp's floors (hold, samples) are checked.
    tick_interval_s: Annotated[float, Meta(gt=0)] = 1.0
    max_command_age_s: Annotated[float, Meta(gt=0)] = 300.0
    max_command_future_s: Annotated[float, Meta(gt=0)] = 30.0
    min_promoted_age_s: Annotated[float, Meta(ge=0)] = 3600.0
    #: ``false`` only for local demos: unsigned commands are then applied.
    require_signature: bool = True
    #: Judge freshness and key validity by a record time its producer chose (CreateTime).
    #: Leave false in production and create the control topic with
    #: ``message.timestamp.type=LogAppendTime`` (``sidecar broker`` and ``--create-topics``
    #: do); the embedded broker (Tansu) keeps CreateTime whatever the topic says, so its
    #: configs set this to true. Replays and epochs still protect it (see the README).
    allow_create_time: bool = False
    #: When a ramp may advance, besides hold and samples: ``none``, ``no_stop`` (unless the
    #: latest guard verdict of the epoch says stop) or ``verdict`` (only with a go verdict on
    #: a window that ended after the step started).
    ramp_gate: Literal["none", "no_stop", "verdict"] = "no_stop"
    #: ``quality``: promotion needs the latest verdict of the epoch to pass the quality gate
    #: (published by the outcomes stage); ``none``: no such condition.
    promote_gate: Literal["none", "quality"] = "none"
    #: Longest a fetch of the control topic waits; bounds rollback propagation latency.
    fetch_max_wait_ms: Annotated[int, Meta(ge=1, le=1000)] = 20


class SidecarConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    models: ModelsConfig
    request_contract: RequestContractConfig = msgspec.field(default_factory=RequestContractConfig)
    kafka: KafkaConfig = msgspec.field(default_factory=KafkaConfig)
    topics: TopicsConfig = msgspec.field(default_factory=TopicsConfig)
    input: InputConfig = msgspec.field(default_factory=InputConfig)
    dead_letter: DeadLetterConfig = msgspec.field(default_factory=DeadLetterConfig)
    pipeline: PipelineConfig = msgspec.field(default_factory=PipelineConfig)
    rollout: RolloutConfig = msgspec.field(default_factory=RolloutConfig)
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)
    logging: LoggingConfig = msgspec.field(default_factory=LoggingConfig)
    control: ControlSettings = msgspec.field(default_factory=ControlSettings)
    aggregate: AggregateSettings = msgspec.field(default_factory=AggregateSettings)
    outputs: OutputsSettings = msgspec.field(default_factory=OutputsSettings)
    registry: RegistrySettings = msgspec.field(default_factory=RegistrySettings)
    outcomes: OutcomesSettings = msgspec.field(default_factory=OutcomesSettings)
    tracing: TracingConfig = msgspec.field(default_factory=TracingConfig)

    @property
    def status_topic(self) -> str:
        return self.control.status_topic or f"{self.topics.control}.status"

    @property
    def audit_topic(self) -> str:
        return self.control.audit_topic or f"{self.topics.control}.audit"

    def all_topics(self) -> list[str]:
        t = self.topics
        return [
            t.requests,
            t.decisions,
            t.comparisons,
            t.dead_letter,
            t.control,
            self.status_topic,
            self.audit_topic,
            self.aggregate.reports_topic,
            *([self.aggregate.partials_topic] if self.shared_rollouts else []),
            *([self.aggregate.late_topic] if self.aggregate.late_topic else []),
            self.outcomes.topic,
            self.outcomes.quality_topic,
            self.outcomes.verdicts_topic,
            *self.outputs.topics(),
        ]

    def rollout_pair(self) -> tuple[str, str, str, str, str] | None:
        """The rollout pair the config runs: rollout, champion name and version, candidate
        name and version (None without a candidate). The aggregator and the outcomes stage
        always keep a place for it, whatever else the comparisons topic names."""
        champion, candidate = self.models.champion, self.models.candidate
        if candidate is None:
            return None
        return (
            self.rollout.name,
            champion.name,
            champion.version,
            candidate.name,
            candidate.version,
        )

    @property
    def shared_rollouts(self) -> bool:
        """Whether a rollout's comparisons are spread over partitions (two-stage aggregation)."""
        return self.topics.comparisons_key == "routing_key"


ENV_PREFIX = "SIDECAR_"

#: Where a config file comes from when ``--config`` is not given.
NO_CONFIG_HINT = (
    "no configuration given: pass --config FILE (examples/sidecar.toml is a complete one to "
    "start from); without a file, at least models.champion (name, version, target, features) "
    "must come from SIDECAR_MODELS__CHAMPION__* environment variables"
)


def _set_path(tree: dict[str, Any], path: list[str], value: str, var: str) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(
                f"environment variable {var}: cannot set {'.'.join(path)}, {part} is not a table"
            )
        node = child
    # A string setting takes the value as it is: a broker list may start with "[" (IPv6).
    text = is_text_setting(SidecarConfig, path)
    node[path[-1]] = value if text else _env_scalar(value, var)


def _env_scalar(value: str, var: str) -> Any:
    """Environment values are strings; msgspec converts them to the target type (strict=False),
    except lists and tables, which are given as JSON."""
    stripped = value.strip()
    if stripped[:1] in ("[", "{"):
        try:
            return msgspec.json.decode(stripped)
        except msgspec.DecodeError as exc:
            raise ConfigError(
                f"environment variable {var}: {value!r} is not valid JSON: {exc}"
            ) from exc
    return value


def apply_env(
    tree: dict[str, Any],
    env: Mapping[str, str],
    sources: dict[tuple[str, ...], str] | None = None,
) -> dict[str, Any]:
    """Overlay ``KAFKA_BOOTSTRAP_SERVERS`` and ``SIDECAR_SECTION__KEY`` variables onto ``tree``.

    A variable that names no setting is a ConfigError naming it (and the closest one that
    does). ``sources`` collects which variable set which path, for later error messages.
    """
    sources = {} if sources is None else sources
    if env.get("KAFKA_BOOTSTRAP_SERVERS"):
        _set_path(
            tree,
            ["kafka", "bootstrap_servers"],
            env["KAFKA_BOOTSTRAP_SERVERS"],
            "KAFKA_BOOTSTRAP_SERVERS",
        )
        sources[("kafka", "bootstrap_servers")] = "KAFKA_BOOTSTRAP_SERVERS"
    for name, value in sorted(env.items()):
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
        if path[0] not in SidecarConfig.__struct_fields__:
            # SIDECAR_TEST_BROKER and friends are not settings; a near-miss of a section is.
            near = closest(path[0], SidecarConfig.__struct_fields__, cutoff=0.8)
            if near is not None:
                raise ConfigError(
                    f"environment variable {name}: there is no section {path[0]!r}; did you "
                    f"mean {ENV_PREFIX}{near.upper()}__...?{LIST_HINT}"
                )
            continue
        problem = check_env_path(SidecarConfig, name, path)
        if problem:
            raise ConfigError(problem)
        _set_path(tree, path, value, name)
        sources[tuple(path)] = name
    return tree


def load_config(path: str | Path | None, env: Mapping[str, str] | None = None) -> SidecarConfig:
    """Load and validate the configuration; every problem is a ConfigError naming the setting
    (or the environment variable it came from)."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            tree = tomllib.loads(p.read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {p} does not exist") from exc
        except IsADirectoryError as exc:
            raise ConfigError(f"config file {p} is a directory; pass the TOML file") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {p} is not valid TOML: {exc}") from exc
    sources: dict[tuple[str, ...], str] = {}
    apply_env(tree, os.environ if env is None else env, sources)
    if path is None and "models" not in tree:
        raise ConfigError(NO_CONFIG_HINT)
    return config_from_dict(tree, source=str(path) if path else "environment", sources=sources)


def config_from_dict(
    tree: dict[str, Any],
    source: str = "config",
    sources: Mapping[tuple[str, ...], str] | None = None,
) -> SidecarConfig:
    try:
        cfg = msgspec.convert(tree, SidecarConfig, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(explain(SidecarConfig, exc, source, sources or {})) from exc
    problem = bootstrap_problem(cfg.kafka.bootstrap_servers)
    if problem:
        var = (sources or {}).get(("kafka", "bootstrap_servers"))
        where = f"environment variable {var}: " if var else ""
        raise ConfigError(
            f"{where}kafka.bootstrap_servers={cfg.kafka.bootstrap_servers!r}: {problem}"
        )
    _check(cfg)
    return cfg


def bootstrap_problem(servers: str) -> str | None:
    """What is wrong with a ``host:port,host:port`` list (None: nothing), so that a typo is a
    ConfigError naming the setting instead of a traceback from the client's address parser.
    A host without a port means 9092; IPv6 literals go in brackets (``[::1]:9092``)."""
    for entry in (e.strip() for e in servers.split(",")):
        if not entry:
            return "an empty entry (give host:port entries separated by commas)"
        if entry.startswith("["):
            host, bracket, rest = entry[1:].partition("]")
            if not bracket:
                return f"{entry!r} has no closing ']' (IPv6 literals: [::1]:9092)"
            if rest and not rest.startswith(":"):
                return f"{entry!r}: expected ':PORT' after ']'"
            port = rest[1:] if rest else None
        elif entry.count(":") > 1:
            host, port = entry, None  # a bare IPv6 literal (no port)
        else:
            host, _, port = entry.partition(":")
            port = port if ":" in entry else None
        if not host:
            return f"{entry!r} has no host"
        if port is None:
            continue
        if not port.isdigit():
            return f"port {port!r} of {entry!r} is not a number"
        if not 1 <= int(port) <= 65535:
            return f"port {int(port)} of {entry!r} is not between 1 and 65535"
    return None


def _check(cfg: SidecarConfig) -> None:
    from .aggregate.report import FIGURES

    for rule in cfg.aggregate.rules:
        for fig in (rule.figure, rule.only_if):
            if fig is not None and "." not in fig and fig not in FIGURES:
                raise ConfigError(
                    f"aggregate.rules: rule {rule.name!r} watches {fig!r}, a quality figure of "
                    "the outcomes stage: put the rule under [[outcomes.rules]]"
                )
    if cfg.kafka.request_timeout_ms <= cfg.kafka.session_timeout_ms:
        raise ConfigError(
            f"kafka.request_timeout_ms ({cfg.kafka.request_timeout_ms}) must exceed "
            f"kafka.session_timeout_ms ({cfg.kafka.session_timeout_ms}): a group join can take "
            "a whole session timeout, and a shorter request timeout fails every join"
        )
    # base64 of value and key, the reason and the coordinates must fit one record.
    dead_letter_bytes = (
        2 * (cfg.dead_letter.max_value_bytes * 4 // 3) + 16_384 + cfg.dead_letter.max_header_bytes
    )
    if dead_letter_bytes > cfg.kafka.max_record_bytes:
        raise ConfigError(
            f"dead_letter.max_value_bytes ({cfg.dead_letter.max_value_bytes}) makes dead "
            f"letters of up to {dead_letter_bytes} bytes, more than kafka.max_record_bytes "
            f"({cfg.kafka.max_record_bytes}); lower it to at most "
            f"{(cfg.kafka.max_record_bytes - 16_384 - cfg.dead_letter.max_header_bytes) * 3 // 8}"
        )
    models = [cfg.models.champion] + ([cfg.models.candidate] if cfg.models.candidate else [])
    for m in models:
        names = [f.name for f in m.features]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ConfigError(f"model {m.name}: feature(s) declared twice: {sorted(dupes)}")
        for f in m.features:
            if f.type == "category" and not f.categories:
                raise ConfigError(f"model {m.name}: category feature {f.name} needs categories")
        problem = output_shape_problem(m.output_kind, m.labels, m.bands, m.k, m.items_from)
        if problem:
            raise ConfigError(f"model {m.name}: output {problem}")
        if m.output_kind in ("multiclass", "ranking") and m.loader != "python":
            raise ConfigError(
                f"model {m.name}: output_kind {m.output_kind} needs loader python (the other "
                f"loaders return one number per request), not {m.loader}"
            )
        if m.loader == "http" and not m.url:
            raise ConfigError(f"model {m.name}: loader http needs url (e.g. http://host:8080)")
        if m.loader in ("python", "process") and ":" not in m.target:
            raise ConfigError(
                f"model {m.name}: target {m.target!r} must look like 'package.module:factory'"
            )
        if m.loader == "mlflow" and not m.target.startswith("models:/"):
            raise ConfigError(
                f"model {m.name}: target {m.target!r} must look like 'models:/NAME@ALIAS' or "
                "'models:/NAME/VERSION' (loader mlflow)"
            )
    _check_outputs(cfg)
    if cfg.models.candidate is None and cfg.rollout.mode is not Mode.SHADOW:
        raise ConfigError(
            f"rollout.mode={cfg.rollout.mode.value} needs models.candidate; "
            "without a candidate only 'shadow' (champion alone) makes sense"
        )
    if cfg.models.candidate is not None:
        for f_cand in cfg.models.candidate.features:
            for f_champ in cfg.models.champion.features:
                if f_cand.name == f_champ.name and f_cand.type != f_champ.type:
                    raise ConfigError(
                        f"feature {f_cand.name} is {f_champ.type} for the champion but "
                        f"{f_cand.type} for the candidate; one request cannot satisfy both"
                    )


def _check_outputs(cfg: SidecarConfig) -> None:
    """Versioned outputs: names and topics distinct, dates and declarative adapters valid
    (callable adapters are imported when the pipeline is built)."""
    from .outputs.adapters import DeclarativeAdapter
    from .outputs.lifecycle import configured_outputs

    out = cfg.outputs
    if not out.versions:
        return
    if out.api_version is None:
        raise ConfigError(
            "outputs.versions is set but outputs.api_version is not: name the current "
            'version (the Decision contract on topics.decisions), e.g. api_version = "v2"'
        )
    names = [out.api_version] + [v.version for v in out.versions]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"outputs: version name(s) {dupes} used twice")
    topics = out.topics()
    # Every other topic the config names (one occurrence of each version's topic taken out:
    # where all_topics() lists them is not assumed); the outcomes stage's internal topics too.
    others = [*cfg.all_topics(), cfg.outcomes.by_task_topic, cfg.outcomes.changelog_topic]
    for topic in topics:
        others.remove(topic)
    for v in out.versions:
        if v.topic in others or topics.count(v.topic) > 1:
            raise ConfigError(
                f"outputs.versions[{v.version}].topic {v.topic!r} is another topic of the "
                "config: each version needs its own"
            )
        if v.adapter is None:
            DeclarativeAdapter(v)
    configured_outputs(out.versions)
