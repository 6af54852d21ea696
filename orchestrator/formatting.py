"""Figures as the reports print them."""

from __future__ import annotations

__all__ = ["duration"]


def duration(seconds: float) -> str:
    """``1 h 05 min``, ``3 min 07 s`` or ``42 s``."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"
