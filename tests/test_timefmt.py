from __future__ import annotations

from sidecar.timefmt import humanise, utc, utc_window


def test_times_and_windows_read_as_utc() -> None:
    assert utc(1718006400000) == "2024-06-10 08:00:00 UTC"
    assert utc(1718006400250) == "2024-06-10 08:00:00.250 UTC"
    assert utc_window(1718006400000, 1718006460000) == "2024-06-10 08:00:00-08:01:00 UTC"
    assert utc_window(1718063940000, 1718064000000) == (
        "2024-06-10 23:59:00 to 2024-06-11 00:00:00 UTC"
    )


def test_raw_windows_in_text_are_rewritten_and_the_rest_kept() -> None:
    old = "guard r: x=2 > 1.5 over 2 window(s); window [1718006400000,1718006460000) ms; ok"
    assert humanise(old) == (
        "guard r: x=2 > 1.5 over 2 window(s); window 2024-06-10 08:00:00-08:01:00 UTC; ok"
    )
    event = "over window [1718006400000, 1718006460000) with 10 pairs"
    assert humanise(event) == "over window 2024-06-10 08:00:00-08:01:00 UTC with 10 pairs"
    assert humanise("offsets [3,4) and id 1718006400000") == "offsets [3,4) and id 1718006400000"
