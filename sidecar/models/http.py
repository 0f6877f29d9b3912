"""The ``http`` loader: a remote model server speaking the Open Inference Protocol (KServe V2
REST), e.g. MLServer, KServe, Triton, Seldon.

One ``POST {url}/v2/models/{target}[/versions/{v}]/infer`` per batch (split by ``max_batch``),
the batch as one ``[n, d]`` tensor. httpx was chosen over aiohttp for its explicit per-call
timeouts and pool limits, its transport that retries only failed *connection attempts* (the
request never reached the server, so retrying is always safe; an inference that may have run
is never retried) and its complete type hints (mypy --strict).

Failures become data like any model failure: connection refused/reset or 502/503/504 are
``unavailable`` (feeding the circuit breaker), slow answers ``timeout``, anything else
``exception`` with the server's message.

``options``: ``input_name`` (``input-0``), ``datatype`` (``FP64`` or ``FP32``), ``output``
(name of the output to request, e.g. ``predict_proba`` on MLServer's scikit-learn runtime;
default: the server's first output), ``output_column`` (column of a 2-D output, default the
last: the positive class of ``predict_proba``), ``model_version`` (adds ``/versions/{v}``),
``retries`` (connection attempts retried, default 2), ``headers`` (extra HTTP headers).
"""

from __future__ import annotations

import logging
from typing import Any

import httpx
import msgspec
import numpy as np
import numpy.typing as npt

from ..config import ModelConfig
from ..errors import ModelLoadError
from .base import FloatArray, ModelUnavailable

log = logging.getLogger(__name__)

_UNAVAILABLE_STATUS = frozenset({502, 503, 504})
_KNOWN_OPTIONS = frozenset(
    {"input_name", "datatype", "output", "output_column", "model_version", "retries", "headers"}
)


class _Tensor(msgspec.Struct):
    name: str
    shape: list[int]
    datatype: str
    data: list[Any]


class _InferResponse(msgspec.Struct):
    outputs: list[_Tensor]
    model_name: str | None = None
    model_version: str | None = None


class OipPredictor:
    """An Open Inference Protocol client for one model; one pooled async client per loop."""

    def __init__(self, config: ModelConfig) -> None:
        options = dict(config.options)
        unknown = set(options) - _KNOWN_OPTIONS
        if unknown:
            raise ModelLoadError(
                f"model {config.name}: unknown http loader option(s) {sorted(unknown)}; "
                f"known: {sorted(_KNOWN_OPTIONS)}"
            )
        assert config.url is not None
        self.base_url = config.url.rstrip("/")
        version = options.get("model_version")
        self.model_path = f"/v2/models/{config.target}" + (
            f"/versions/{version}" if version else ""
        )
        self.infer_url = f"{self.model_path}/infer"
        self._input_name = str(options.get("input_name", "input-0"))
        self._datatype = str(options.get("datatype", "FP64"))
        if self._datatype not in ("FP64", "FP32"):
            raise ModelLoadError(f"model {config.name}: datatype must be FP64 or FP32")
        self._output = options.get("output")
        self._column = int(options.get("output_column", -1))
        self._retries = int(options.get("retries", 2))
        self._headers = {"content-type": "application/json", **options.get("headers", {})}
        self._concurrency = config.concurrency
        # A little longer than the model's timeout: the ScoringModel's timeout fires first
        # and reports ``timeout``; this only bounds a call nobody waits for any more.
        self._timeout = httpx.Timeout(config.timeout_ms / 1000.0 + 1.0)
        self._client: httpx.AsyncClient | None = None
        self._encoder = msgspec.json.Encoder()
        self._decoder = msgspec.json.Decoder(_InferResponse)
        self.name = config.name

    def _new_client(self) -> httpx.AsyncClient:
        limits = httpx.Limits(
            max_connections=self._concurrency, max_keepalive_connections=self._concurrency
        )
        return httpx.AsyncClient(
            base_url=self.base_url,
            timeout=self._timeout,
            transport=httpx.AsyncHTTPTransport(retries=self._retries, limits=limits),
            headers=self._headers,
        )

    def request_body(self, batch: FloatArray) -> bytes:
        n, d = batch.shape
        doc: dict[str, Any] = {
            "inputs": [
                {
                    "name": self._input_name,
                    "shape": [n, d],
                    "datatype": self._datatype,
                    "data": batch.ravel().tolist(),
                }
            ]
        }
        if self._output:
            doc["outputs"] = [{"name": self._output}]
        return self._encoder.encode(doc)

    def scores_from(self, body: bytes, n: int) -> FloatArray:
        response = self._decoder.decode(body)
        if not response.outputs:
            raise ValueError("response has no outputs")
        out = response.outputs[0]
        if self._output:
            named = [o for o in response.outputs if o.name == self._output]
            if not named:
                raise ValueError(f"response has no output {self._output!r}")
            out = named[0]
        values: npt.NDArray[np.float64] = np.asarray(out.data, dtype=np.float64)
        if len(out.shape) == 2 and out.shape[1] > 1:
            values = values.reshape(out.shape)[:, self._column]
        return values.reshape(-1)

    async def predict_async(self, batch: FloatArray) -> FloatArray:
        if self._client is None:
            self._client = self._new_client()
        try:
            response = await self._client.post(self.infer_url, content=self.request_body(batch))
        except httpx.TimeoutException as exc:
            raise TimeoutError(f"{self.base_url}: {type(exc).__name__}") from exc
        except (httpx.TransportError, OSError) as exc:
            raise ModelUnavailable(
                f"model server {self.base_url} unreachable: {type(exc).__name__}: {exc}"
            ) from exc
        if response.status_code in _UNAVAILABLE_STATUS:
            raise ModelUnavailable(
                f"model server {self.base_url} answered {response.status_code}: "
                f"{response.text[:200]}"
            )
        if response.status_code != 200:
            raise RuntimeError(
                f"{self.base_url}{self.infer_url} answered {response.status_code}: "
                f"{response.text[:300]}"
            )
        return self.scores_from(response.content, batch.shape[0])

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def probe(self) -> str | None:
        """A synchronous readiness check at load time; the reason when not ready."""
        try:
            response = httpx.get(f"{self.base_url}{self.model_path}/ready", timeout=2.0)
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"
        if response.status_code != 200:
            return f"GET {self.model_path}/ready answered {response.status_code}"
        return None


def load_http(config: ModelConfig) -> OipPredictor:
    predictor = OipPredictor(config)
    problem = predictor.probe()
    if problem is not None:
        # Not fatal: the server may start after the sidecar; until it answers, calls fail as
        # ``unavailable`` (champion failure policy, breaker) and nothing is lost.
        log.warning(
            "model %s: server %s not ready at start (%s); scoring will fail as unavailable "
            "until it is",
            config.name,
            predictor.base_url,
            problem,
        )
    return predictor
