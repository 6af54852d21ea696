"""bench/RESULTS.md is assembled from sections, one per benchmark, each between its own markers."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")
HEADER = "# Benchmark results\n\nWritten by `make bench` (each section by the script it names).\n\n"


def write_section(marker: str, lines: list[str]) -> None:
    """Replace the section between two ``marker`` lines (or append it) and save the file."""
    section = "\n".join([marker, *lines, marker])
    text = RESULTS.read_text() if RESULTS.exists() else HEADER
    if marker in text:
        head, _, rest = text.partition(marker)
        text = head + section + rest.partition(marker)[2]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    RESULTS.write_text(text)
    print(f"wrote {RESULTS}")
