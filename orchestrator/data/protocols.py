"""The papers' data protocols (``data.protocol``): their calibration windows and their held-out
WikiText-2 windows, cut exactly as their code cuts them.

=============  ================================================================================
protocol       calibration (``data.corpus``)                         held-out (``data.evaluation``)
=============  ================================================================================
rayprune       seeded disjoint windows of the corpus's train split,   the same, of its test split
               documents joined with EOS, no BOS (windows.py)
blockpruner    ``rows`` (256) Alpaca rows of its 80/10/10 test part,  WikiText-2 test rows joined
               ``random.sample`` after seed 42, joined with blank     with blank lines, tokenized
               lines, tokenized once (BOS at the start), every        once (BOS at the start), every
               whole 2048-token window in order                       whole 2048-token window
multipruner    as blockpruner from one generator: ``width_rows``      as blockpruner
               (128) drawn first (window set ``calibration_width``,
               its width stages), then ``rows`` (256, ``calibration``)
sprint         WikiText-2 train rows joined with spaces, tokenized    as blockpruner
               once (BOS), 128 windows of 2048 at
               ``random.randint(0, n - 2048 - 1)`` after
               ``random.seed(0)`` (they may overlap)
evopress       FineWeb-Edu sample-10BT streamed, ``shuffle(seed=0,    as blockpruner without BOS
               buffer_size=10_000)``, each document tokenized          (``add_special_tokens=False``),
               without special tokens and cut into pieces of at       4096-token windows (its
               most 4096, until 131,072 tokens; the pieces packed     Llama-2 length)
               in order into 32 windows of 4096
=============  ================================================================================

Sources: BlockPruner block_search.py, eval.py, utils.py; MultiPruner run_multipruner.py, eval.py,
utils.py; SPRINT src/utils/data_utils.py (get_wikitext2), eval_utils.py; EvoPress src/data_utils.py
(get_fineweb_edu, get_wikitext2). The one deliberate difference: EvoPress's calibration pieces have
different lengths (a short document is a piece of its own); rayprune's windows have one length, so
the same tokens, in the same order, are packed into windows (a piece's first token is then predicted
from the piece before it). Every dataset is read through ``datasets`` (:mod:`orchestrator.data.rows`):
the hub ids above by default, or a local file of the same rows. The tokenizer is the model's own
(SPRINT loads Llama's slow tokenizer; rayprune loads the fast one).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    import numpy as np
    from transformers import PreTrainedTokenizerBase

    from ..config import DataConfig

__all__ = ["EVOPRESS_SHUFFLE_BUFFER", "WIDTH_WINDOWS", "calibration_windows", "describe_protocol", "evaluation_windows"]

WIDTH_WINDOWS = "calibration_width"  # the window set of MultiPruner's width stages (its first draw of rows)

EVOPRESS_SHUFFLE_BUFFER = 10_000  # get_fineweb_edu: dataset.shuffle(seed=0, buffer_size=10_000)
_BOS = {"blockpruner": True, "multipruner": True, "sprint": True, "evopress": False}  # tokenizer(text) or not


def _paper(protocol: str) -> None:
    if protocol not in _BOS:
        raise ValueError(f"data.protocol {protocol!r} has no paper sampler; use one of {', '.join(_BOS)}")


def evaluation_windows(tokenizer: PreTrainedTokenizerBase, protocol: str, corpus: str, sequences: int | None,
                       length: int) -> np.ndarray:
    """The held-out windows of a paper protocol: every row of ``corpus`` (WikiText-2 test) joined
    with blank lines, tokenized once (special tokens as the paper), cut into consecutive windows."""
    from .cuts import consecutive_windows, encode
    from .rows import read_rows

    _paper(protocol)
    ids = encode(tokenizer, "\n\n".join(read_rows(corpus)), special_tokens=_BOS[protocol])
    return consecutive_windows(ids, length, sequences, "evaluation")


def calibration_windows(tokenizer: PreTrainedTokenizerBase, data: DataConfig) -> dict[str, np.ndarray]:
    """The calibration window sets of a paper protocol: ``calibration``, and for multipruner also
    ``calibration_width`` (the rows its width stages use)."""
    from .cuts import consecutive_windows, document_pieces, encode, pack, random_windows
    from .rows import read_rows, stream_rows

    protocol, cal = data.protocol, data.calibration
    _paper(protocol)
    if protocol in ("blockpruner", "multipruner"):
        from .alpaca import alpaca_test_part, draw_rows

        counts = [cal.rows] if protocol == "blockpruner" else [cal.width_rows, cal.rows]
        draws = draw_rows(alpaca_test_part(read_rows(data.corpus)), counts, cal.seed)
        windows = [consecutive_windows(encode(tokenizer, "\n\n".join(rows), special_tokens=True), cal.length,
                                       cal.sequences, "calibration") for rows in draws]
        return {"calibration": windows[-1]} | ({WIDTH_WINDOWS: windows[0]} if len(windows) == 2 else {})
    if protocol == "sprint":
        ids = encode(tokenizer, " ".join(read_rows(data.corpus)), special_tokens=True)
        return {"calibration": random_windows(ids, cal.length, cal.sequences, cal.seed, "calibration")}
    stream, column = stream_rows(data.corpus)  # evopress
    documents = (row[column] for row in stream.shuffle(seed=cal.seed, buffer_size=EVOPRESS_SHUFFLE_BUFFER))
    pieces = document_pieces(tokenizer, documents, cal.sequences * cal.length, cal.length, "calibration")
    return {"calibration": pack(pieces, cal.length)}


# ---- the report's line ------------------------------------------------------------------------------
def _count(sequences: Any, length: Any) -> str:
    return f"every whole {length}-token window" if sequences is None else f"{sequences} x {length} tokens"


def describe_protocol(data: Mapping[str, Any]) -> str:
    """One sentence naming the data protocol of a run, from its config.yaml ``data`` mapping
    (a run written before protocols existed is ``rayprune``)."""
    protocol = data.get("protocol") or "rayprune"
    cal, ev = data.get("calibration") or {}, data.get("evaluation") or {}
    corpus = data.get("corpus", "wikipedia")
    held = f"held-out {_count(ev.get('sequences'), ev.get('length'))} of `{ev.get('corpus') or corpus}`"
    if protocol == "rayprune":
        calibration = (f"calibration {_count(cal.get('sequences'), cal.get('length'))} drawn with seed "
                       f"{cal.get('seed')} from the train split of `{corpus}` (documents joined with EOS)")
        held += f", its test split (seed {ev.get('seed')})"
    elif protocol in ("blockpruner", "multipruner"):
        rows = (f"{cal.get('width_rows')} (width stages) then {cal.get('rows')}" if protocol == "multipruner"
                else f"{cal.get('rows')}")
        calibration = (f"calibration {rows} Alpaca rows of `{corpus}` (random.seed {cal.get('seed')}) joined with "
                       f"blank lines, {_count(cal.get('sequences'), cal.get('length'))}")
    elif protocol == "sprint":
        calibration = (f"calibration {_count(cal.get('sequences'), cal.get('length'))} at random offsets "
                       f"(random.seed {cal.get('seed')}) of `{corpus}` joined with spaces")
    else:
        calibration = (f"calibration {(cal.get('sequences') or 0) * (cal.get('length') or 0):,} tokens of `{corpus}` "
                       f"(streamed, shuffle seed {cal.get('seed')}) packed into {cal.get('length')}-token windows")
    if cal.get("windows"):
        calibration = f"calibration windows read from `{cal['windows']}`"
    if protocol == "rayprune":
        return f"Data protocol: rayprune; {calibration}; {held}."
    bos = "no BOS" if protocol == "evopress" else "the tokenizer's BOS at the start"
    return f"Data protocol: {protocol} (as its code); {calibration}; {held} joined with blank lines ({bos})."
