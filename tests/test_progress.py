"""The progress line: counts and a rate on a terminal, nothing otherwise (pipeline.progress)."""

from __future__ import annotations

import io

from pipeline.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_draws_count_rate_and_extra_on_a_terminal() -> None:
    out = Terminal()
    bar = Progress("rebuild", stream=out, unit="items")
    bar.add(1_200, "devices 1,200/5,000")
    bar.done()
    text = out.getvalue()
    assert "rebuild: 1,200 items (" in text and "/s), devices 1,200/5,000" in text
    assert text.endswith("\n")


def test_progress_is_silent_when_quiet_or_not_a_terminal() -> None:
    for bar, out in ((Progress("demo", stream=(t := Terminal()), quiet=True), t),
                     (Progress("demo", stream=(s := io.StringIO())), s)):
        bar.add(5)
        bar.clear()
        bar.done()
        assert out.getvalue() == ""
        assert bar.count == 5
