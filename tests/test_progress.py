"""The progress line of ``sidecar run`` (pure parts; the broker test is in
tests/integration/test_progress_broker.py)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

from sidecar.progress import Sample, counter_total, summary


def sample(at: float, processed: int, dead: int = 0, lag: int | None = 0, **kw: object) -> Sample:
    base: dict[str, object] = {
        "mode": "shadow",
        "share_bp": 0,
        "epoch": 0,
        "partitions": 3,
        "in_flight": 0,
    }
    base.update(kw)
    return Sample(at, processed, dead, lag, **base)  # type: ignore[arg-type]


def test_the_line_has_rate_lag_dead_letters_mode_and_epoch() -> None:
    line = summary(
        sample(100.0, 1_000, dead=2),
        sample(110.0, 21_000, dead=5, lag=1_234, mode="canary", share_bp=1_050, epoch=4),
    )
    assert line == (
        "progress: 2,000 records/s, lag 1,234, 5 dead letters (+3), mode canary 10.5%, "
        "epoch 4, 3 partitions, 0 in flight, 21,000 records in all"
    )


def test_the_first_line_and_an_unknown_lag_say_so() -> None:
    line = summary(None, sample(0.0, 0, lag=None))
    assert line.startswith("progress: starting, lag unknown, 0 dead letters (+0), mode shadow,")


def test_counter_total_adds_every_label() -> None:
    counter = Counter("x", "x", ["kind"], registry=CollectorRegistry())
    assert counter_total(counter) == 0
    counter.labels("a").inc(2)
    counter.labels("b").inc(3)
    assert counter_total(counter) == 5


def test_partition_lag_in_records_and_seconds() -> None:
    from sidecar.progress import STALE_FETCH_MS, PartitionLag, partition_lag

    now = 1_700_000_010_000
    assert partition_lag(0, None, 5, now - 1, now) == PartitionLag(0, None, None)
    assert partition_lag(0, 10, None, now - 1, now) == PartitionLag(0, None, None)
    assert partition_lag(1, 10, 10, now - 9_000, now) == PartitionLag(1, 0, 0.0)  # caught up
    assert partition_lag(2, 12, 10, now - 2_500, now) == PartitionLag(2, 2, 2.5)
    assert partition_lag(3, 12, 10, None, now) == PartitionLag(3, 2, None)  # none consumed
    assert partition_lag(4, 12, 10, now + 5_000, now) == PartitionLag(4, 2, 0.0)  # skewed
    # A high watermark from a fetch answered long ago (a broker away) says nothing now.
    fresh, stale = now - STALE_FETCH_MS, now - STALE_FETCH_MS - 1
    assert partition_lag(5, 10, 10, now - 1, now, fresh) == PartitionLag(5, 0, 0.0)
    assert partition_lag(5, 10, 10, now - 1, now, stale) == PartitionLag(5, None, None)


def test_lag_detail_names_the_worst_partitions_and_stays_short() -> None:
    from sidecar.progress import PartitionLag, lag_detail

    assert lag_detail(None) == "not sampled yet"
    assert lag_detail([]) == "no partitions assigned"
    lags = [PartitionLag(p, p * 10, float(p)) for p in range(200)] + [PartitionLag(7, None, None)]
    text = lag_detail(lags)
    assert text.startswith(f"{sum(p * 10 for p in range(200)):,} records behind on 201 partitions")
    assert "(1 unknown)" in text and "p199 1,990 records 199.0s" in text
    assert text.count(" records ") == 5 + 1 and len(text) < 300
    assert lag_detail([PartitionLag(0, 0, 0.0)]) == "0 records behind on 1 partitions"
