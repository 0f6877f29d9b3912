"""Ground truth for model outputs: delayed outcomes judged against what each arm returned.

On this branch only :mod:`.ranking` (ranking quality over clicked item ids, pure functions
and a mergeable accumulator); the outcomes stream and its join are issue 14's.
"""
