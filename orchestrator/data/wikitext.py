"""MediaWiki markup to plain prose: reading a ``.xml.bz2`` dump and cleaning each article's wikitext.

Used by the ``wikipedia`` corpus preset (:mod:`orchestrator.data.corpus`); bump its ``_WIKI_VERSION`` when the
cleaning here changes, so cached text is rebuilt.
"""

from __future__ import annotations

import bz2
import html
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterator

__all__ = ["clean_wikitext"]


def _read_articles(path: Path) -> Iterator[tuple[str, str]]:
    """``(title, wikitext)`` of every main-namespace, non-redirect page of a ``.xml.bz2`` dump."""
    with bz2.open(path) as stream:
        for _, element in ET.iterparse(stream):
            if not element.tag.endswith("}page"):
                continue
            title = element.findtext("{*}title") or ""
            main = element.findtext("{*}ns") == "0"
            redirect = element.find("{*}redirect") is not None
            text = element.findtext("{*}revision/{*}text") or ""
            element.clear()  # keeps memory flat on large dumps
            if main and not redirect and not text.lstrip().upper().startswith("#REDIRECT"):
                yield title, text


#: Level-2 sections that hold links or citations rather than prose.
_DROPPED_SECTIONS = {
    "references", "notes", "footnotes", "citations", "sources", "bibliography", "see also",
    "external links", "further reading", "notes and references", "references and notes",
}
#: Links dropped with their text: images, categories, interlanguage links.
_DROPPED_LINK = re.compile(r"^\s*(file|image|media|category|[a-z]{2,3}(-[a-z]+)?)\s*:", re.IGNORECASE)
#: Elements dropped with their content.
_DROPPED_ELEMENTS = "ref|gallery|math|timeline|imagemap|score|chem|ce|syntaxhighlight|source|graph"
_INNERMOST_LINK = re.compile(r"\[\[((?:[^\[\]]|\[(?!\[)|\](?!\]))*?)\]\]")  # may hold a lone [ or ]


def clean_wikitext(text: str) -> str:
    """The prose of one article: markup removed, one paragraph a line, no blank lines.

    Drops comments, references, math, templates ``{{..}}`` (nested), tables ``{|..|}``, file,
    category and language links, reference sections; keeps link labels, heading text and the
    content of other HTML tags. Simple by design: good calibration text, not a wikitext parser.
    """
    text = re.sub(r"<!--.*?(?:-->|$)", "", text, flags=re.DOTALL)
    text = re.sub(rf"<({_DROPPED_ELEMENTS})\b[^>]*/>", "", text, flags=re.IGNORECASE)
    text = re.sub(rf"<({_DROPPED_ELEMENTS})\b[^>]*>.*?</\1\s*>", "", text, flags=re.IGNORECASE | re.DOTALL)
    text = _drop_nested(text, re.compile(r"\{\{|\}\}"), "{{")
    text = _drop_nested(text, re.compile(r"^[ \t]*\{\||^[ \t]*\|\}", re.MULTILINE), "{|")
    while (replaced := _INNERMOST_LINK.subn(_link_label, text))[1]:  # innermost first: captions
        text = replaced[0]
    text = re.sub(r"\[(?:https?:)?//[^\s\]]+\s*([^\]]*)\]", r"\1", text)  # [url label] -> label
    text = re.sub(r"</?[A-Za-z][^<>]*>", "", text)  # other tags: keep the content
    text = re.sub(r"'{2,}|__[A-Z]+__", "", text)  # bold, italics, __TOC__
    text = html.unescape(text).replace("\u00a0", " ")
    return _layout(text)


def _link_label(match: re.Match[str]) -> str:
    inner = match.group(1)
    return "" if _DROPPED_LINK.match(inner) else inner.rsplit("|", 1)[-1].lstrip(":")


def _drop_nested(text: str, tokens: re.Pattern[str], opener: str) -> str:
    """Remove nested ``opener .. closer`` spans. A stray closer is dropped; an unclosed opener
    drops the rest of its line only, so one broken template cannot eat an article."""
    out: list[str] = []
    depth = position = start = 0
    for match in tokens.finditer(text):
        if depth == 0:
            out.append(text[position:match.start()])
            start = match.start()
        depth = depth + 1 if match.group().strip() == opener else max(depth - 1, 0)
        position = match.end()
    if depth:
        line_end = text.find("\n", start)
        position = len(text) if line_end < 0 else line_end
    out.append(text[position:])
    return "".join(out)


def _layout(text: str) -> str:
    """Headings to plain lines, list markers and empty brackets gone, reference sections dropped."""
    kept: list[str] = []
    dropping = False
    for line in text.split("\n"):
        line = line.strip()
        if heading := re.fullmatch(r"(={2,6})\s*(.*?)\s*\1", line):
            if len(heading.group(1)) == 2:
                dropping = heading.group(2).lower() in _DROPPED_SECTIONS
            line = heading.group(2)
        line = re.sub(r"^[*#:;]+", "", line)
        line = re.sub(r"\(\s*[,;]?\s*\)", "", re.sub(r"\(\s*[,;]\s*", "(", line))  # "( ; x)" -> "(x)"
        line = re.sub(r"[ \t]{2,}", " ", line).strip()
        if line and not dropping and re.search(r"\w", line):
            kept.append(line)
    return "\n".join(kept)
