"""Ground truth: delayed outcomes joined to comparisons, and whether the candidate is *better*.

``sidecar outcomes`` joins the comparison topic with an outcomes topic (a chargeback days after
a payment, a click seconds after a recommendation) by request id within a label window, keeps
its state in RocksDB with a compacted changelog topic, and publishes per-window
``QualityReport``s (provisional while labels may still arrive, final after) and per-rollout
``QualityVerdict``s (a non-inferiority test) that ramps and promotion can be gated on
(:func:`sidecar.outcomes.gates.quality_gate`).

Pure parts (no Kafka): :mod:`.contract` (the ``Outcome`` contract), :mod:`.quality` (paired
statistics over mergeable accumulators), :mod:`.report` (the report and verdict contracts),
:mod:`.gates`, :mod:`.join` (the join over a key-value store), :mod:`.ranking` (ranking
quality over clicked item ids: CTR, NDCG, MRR). The store is :mod:`.store` (RocksDB); the
Kafka edge is :mod:`.service` and :mod:`.router`.

This module imports nothing on purpose: ``sidecar.aggregate.guards`` reads the quality figure
names from :mod:`.figures`, and the package must not pull the aggregator back in.
"""
