"""MediaWiki markup cleaning: templates, links, references, tables and reference sections."""

from __future__ import annotations

import pytest

from orchestrator.data.wikitext import clean_wikitext


@pytest.mark.parametrize(
    "wikitext, expected",
    [
        ("{{Infobox|a={{nested|x}}}}Kept '''bold''' text.", "Kept bold text."),
        ("A [[target|label]] and [[plain]].", "A label and plain."),
        ("[[File:x.jpg|thumb|A caption with [[a link]] [1.1.0].]]Body.", "Body."),
        ("Fact.<ref name=a>Cite {{x}}</ref> More.<ref name=b/>", "Fact. More."),
        ("== History ==\n* item one\n{|\n| cell\n|}\nEnd", "History\nitem one\nEnd"),
        ("Prose.\n== References ==\n{{reflist}}\nSmith 2001.\n== Later ==\nBack.", "Prose.\nLater\nBack."),
        ("The aardvark ({{IPA|x}}; Orycteropus afer) is.", "The aardvark (Orycteropus afer) is."),
        ("[[Category:Mammals]][[de:Erdferkel]]Text &amp; more<!-- hidden -->.", "Text & more."),
    ],
)
def test_clean_wikitext(wikitext, expected):
    assert clean_wikitext(wikitext) == expected
