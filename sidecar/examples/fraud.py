"""Card-transaction fraud: a seeded traffic generator and two real logistic-regression models.

Both models are fitted (Newton / IRLS, numpy only) on transactions from the same seeded
generator, so they are real models with real ranking quality, reproducible without any download:

* the **champion** sees six features;
* the **candidate** sees all eight (it adds ``device_score`` and ``distance_km``), so it ranks
  fraud better. Its ``flag_shift`` option moves its scores up at the shared threshold, which is
  the failure this project exists to catch: better offline, twice the flags in production.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

#: The request features, in the order of the generator's matrix columns.
FEATURES: tuple[str, ...] = (
    "amount",
    "hour",
    "merchant_risk",
    "velocity_1h",
    "velocity_24h",
    "account_age_days",
    "distance_km",
    "device_score",
)
CHAMPION_FEATURES = FEATURES[:6]
CANDIDATE_FEATURES = FEATURES


@dataclass(frozen=True)
class Transactions:
    features: FloatArray  # (n, 8) in FEATURES order
    is_fraud: npt.NDArray[np.bool_]
    card_ids: list[str]


def generate(n: int, seed: int = 0, fraud_rate: float = 0.02, cards: int = 50_000) -> Transactions:
    """Seeded synthetic card transactions with a known fraud label."""
    rng = np.random.default_rng(seed)
    fraud = rng.random(n) < fraud_rate
    # Signals overlap on purpose: neither model is perfect, and the two features only the
    # candidate sees (distance, device score) carry real extra signal.
    amount = np.where(fraud, rng.lognormal(4.1, 1.1, n), rng.lognormal(3.6, 1.0, n))
    night = rng.random(n) < np.where(fraud, 0.35, 0.12)
    hour = np.where(night, rng.choice([0, 1, 2, 3, 4, 23], n), rng.integers(5, 23, n))
    hour = hour.astype(float)
    merchant_risk = np.clip(rng.beta(2, 8, n) + fraud * rng.normal(0.05, 0.1, n), 0, 1)
    velocity_1h = rng.poisson(np.where(fraud, 1.1, 0.6), n).astype(float)
    velocity_24h = velocity_1h + rng.poisson(np.where(fraud, 4.0, 3.0), n)
    account_age_days = np.where(fraud, rng.exponential(500, n), rng.exponential(900, n))
    distance_km = np.where(fraud, rng.exponential(90, n), rng.exponential(25, n))
    device_score = np.clip(rng.normal(np.where(fraud, 0.5, 0.3), 0.15, n), 0, 1)
    matrix = np.column_stack(
        [
            amount,
            hour,
            merchant_risk,
            velocity_1h,
            velocity_24h,
            account_age_days,
            distance_km,
            device_score,
        ]
    )
    card_ids = [f"card-{c:06d}" for c in rng.integers(0, cards, n)]
    return Transactions(features=matrix, is_fraud=fraud, card_ids=card_ids)


def _design(x: FloatArray) -> FloatArray:
    """Feature transform shared by fitting and scoring: logs for the heavy tails, night flag."""
    out = np.array(x, dtype=np.float64, copy=True)
    out[:, 0] = np.log1p(np.maximum(out[:, 0], 0))  # amount
    out[:, 1] = ((out[:, 1] < 5) | (out[:, 1] >= 23)).astype(float)  # night hour
    if out.shape[1] > 5:
        out[:, 5] = np.log1p(np.maximum(out[:, 5], 0))  # account age
    if out.shape[1] > 6:
        out[:, 6] = np.log1p(np.maximum(out[:, 6], 0))  # distance
    return np.nan_to_num(out, nan=0.0)


def fit_logistic(x: FloatArray, y: npt.NDArray[np.bool_], l2: float = 1e-3) -> LogisticModel:
    """Fit a logistic regression by Newton's method (IRLS) on standardised inputs."""
    design = _design(x)
    mean, std = design.mean(axis=0), design.std(axis=0) + 1e-9
    z = np.column_stack([np.ones(len(design)), (design - mean) / std])
    w = np.zeros(z.shape[1])
    target = y.astype(float)
    for _ in range(25):
        p = 1.0 / (1.0 + np.exp(-(z @ w)))
        grad = z.T @ (p - target) + l2 * w
        hess = (z * (p * (1 - p))[:, None]).T @ z + l2 * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return LogisticModel(coef=w[1:] / std, intercept=float(w[0] - (w[1:] * mean / std).sum()))


@dataclass(frozen=True)
class LogisticModel:
    """``predict`` scores a float64 matrix whose columns are the model's features in order."""

    coef: FloatArray
    intercept: float
    flag_shift: float = 0.0

    def predict(self, batch: FloatArray) -> FloatArray:
        logits = _design(batch) @ self.coef + self.intercept + self.flag_shift
        with np.errstate(over="ignore"):  # a huge feature value: exp -> inf, score 0.0
            result: FloatArray = 1.0 / (1.0 + np.exp(-logits))
        return result


_TRAINING_ROWS = 40_000


def champion(seed: int = 1) -> LogisticModel:
    """The model in production: six features."""
    data = generate(_TRAINING_ROWS, seed=seed, fraud_rate=0.05)
    return fit_logistic(data.features[:, : len(CHAMPION_FEATURES)], data.is_fraud)


def candidate(seed: int = 2, flag_shift: float = 0.0) -> LogisticModel:
    """The new model: all eight features; ``flag_shift`` (logit units) raises its scores."""
    data = generate(_TRAINING_ROWS, seed=seed, fraud_rate=0.05)
    model = fit_logistic(data.features, data.is_fraud)
    return LogisticModel(coef=model.coef, intercept=model.intercept, flag_shift=flag_shift)


def request_dicts(data: Transactions, start_id: int = 0) -> list[dict[str, object]]:
    """InferenceRequest v1 objects for generated transactions (ids ``req-<n>``)."""
    rows = data.features.tolist()
    return [
        {
            "request_id": f"req-{start_id + i}",
            "routing_key": card,
            "features": dict(zip(FEATURES, row, strict=True)),
        }
        for i, (card, row) in enumerate(zip(data.card_ids, rows, strict=True))
    ]
