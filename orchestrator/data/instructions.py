"""Alpaca-format instruction data for recovery fine-tuning: reading rows, the prompt, the tokens.

MultiPruner's recovery step (``recovery/finetune.py``, itself alpaca-lora's ``finetune.py``) trains
on Alpaca rows ``{instruction, input, output}`` rendered with alpaca-lora's template, and learns only
the response: ``train_on_inputs=False`` masks the prompt's tokens out of the loss, and
``add_eos_token=True`` appends EOS so that the model learns to stop. We follow it token for token so
that a recovery run here trains on what the paper's recipe trains on.

Rows come from a local ``.jsonl`` file (one object a line), a local ``.json`` file (a list of
objects) or a hub dataset ``hf:NAME:SPLIT`` / ``hf:NAME:CONFIG:SPLIT`` (``datasets.load_dataset``).
Every problem is a :class:`~orchestrator.data.corpus.CorpusError` naming the file, the line and the
fix, raised before any training starts. datasets and transformers load inside functions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .corpus import CorpusError, load_hub_split

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["IGNORE", "PROMPT_INPUT", "PROMPT_NO_INPUT", "alpaca_prompt", "parse_instruction_hub_spec",
           "read_instructions", "tokenize_instruction", "tokenize_instructions"]

#: alpaca-lora's templates/alpaca.json, as MultiPruner's recovery/finetune.py uses them.
PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
IGNORE = -100  # the label torch's cross-entropy skips
_FIX = ('give one JSON object a line with string keys "instruction" and "output" (and optionally "input"), '
        "as in Alpaca's alpaca_data.json")


# --------------------------------------------------------------------------- reading rows


def read_instructions(spec: str) -> list[dict[str, str]]:
    """Rows ``{instruction, input, output}`` (all strings; ``input`` missing or null is "") of ``spec``: a
    local ``.jsonl`` (blank lines skipped) or ``.json`` (a list of objects) file, or
    ``hf:NAME[:CONFIG]:SPLIT``. Raises :class:`CorpusError` for a missing file, a line that is not
    JSON, a row without ``instruction`` or ``output``, a value that is not a string, or no rows."""
    if spec.startswith("hf:"):
        return _hub_rows(spec)
    path = Path(spec).expanduser()
    if path.suffix not in (".jsonl", ".json"):
        raise CorpusError(f"instruction data {spec!r} must be a .jsonl or .json file or hf:NAME[:CONFIG]:SPLIT.")
    if not path.is_file():
        raise CorpusError(f"instruction file {path} does not exist; give a local Alpaca JSONL file or data: run.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise CorpusError(f"instruction file {path} is not UTF-8 ({err}); convert it to UTF-8.") from err
    rows = _jsonl_rows(path, text) if path.suffix == ".jsonl" else _json_rows(path, text)
    if not rows:
        raise CorpusError(f"instruction file {path} holds no rows; {_FIX}.")
    return rows


def _jsonl_rows(path: Path, text: str) -> list[dict[str, str]]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise CorpusError(f"{path} line {number} is not JSON ({err.msg} at column {err.colno}); {_FIX}.") from err
        rows.append(_row(value, f"{path} line {number}"))
    return rows


def _json_rows(path: Path, text: str) -> list[dict[str, str]]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise CorpusError(f"{path} is not JSON ({err.msg} at line {err.lineno}, column {err.colno}); "
                          f"a .json file holds one list of objects, or use .jsonl with one object a line.") from err
    if not isinstance(value, list):
        raise CorpusError(f"{path} holds a JSON {type(value).__name__}, not a list of objects; {_FIX}.")
    return [_row(item, f"{path} item {index}") for index, item in enumerate(value)]


def _row(value: Any, where: str) -> dict[str, str]:
    """One validated row; ``where`` (file and line, or dataset and row) heads every error."""
    if not isinstance(value, dict):
        raise CorpusError(f"{where} is a JSON {type(value).__name__}, not an object; {_FIX}.")
    missing = [key for key in ("instruction", "output") if key not in value]
    if missing:
        raise CorpusError(f"{where} has no {' or '.join(map(repr, missing))} (keys: {sorted(value)}); {_FIX}.")
    given = value.get("input")
    row = {"instruction": value["instruction"], "input": "" if given is None else given, "output": value["output"]}
    for key, field in row.items():
        if not isinstance(field, str):
            raise CorpusError(f"{where}: {key!r} is {type(field).__name__} {field!r}, not a string; {_FIX}.")
    return row


def parse_instruction_hub_spec(spec: str) -> tuple[str, str | None, str]:
    """``(name, config, split)`` of ``hf:NAME:SPLIT`` or ``hf:NAME:CONFIG:SPLIT``; CorpusError if malformed."""
    parts = spec.split(":")[1:]
    if not spec.startswith("hf:") or len(parts) not in (2, 3) or not all(parts):
        raise CorpusError(f"instruction data {spec!r} is malformed; give hf:NAME:SPLIT (e.g. "
                          f"hf:yahma/alpaca-cleaned:train) or hf:NAME:CONFIG:SPLIT, or a local JSONL file.")
    return (parts[0], None, parts[1]) if len(parts) == 2 else (parts[0], parts[1], parts[2])


def _hub_rows(spec: str) -> list[dict[str, str]]:
    name, config, split = parse_instruction_hub_spec(spec)
    data = load_hub_split(spec, name, config, split, what="instruction data",
                          instead="a local Alpaca JSONL file, or data: run")
    rows = [_row(value, f"{spec} row {index}") for index, value in enumerate(data)]
    if not rows:
        raise CorpusError(f"instruction data {spec!r} has no rows in split {split!r}; name another split.")
    return rows


# --------------------------------------------------------------------------- prompt and tokens


def alpaca_prompt(instruction: str, input: str = "") -> str:  # noqa: A002 (Alpaca's own field name)
    """The prompt alpaca-lora trains on, ending with "### Response:\\n"; the no-input variant when
    ``input`` is empty. The response (the row's ``output``) follows it directly."""
    if input:
        return PROMPT_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def tokenize_instruction(tokenizer: PreTrainedTokenizerBase, row: dict[str, str],
                         max_length: int) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one row, as alpaca-lora's ``generate_and_tokenize_prompt`` with
    ``train_on_inputs=False, add_eos_token=True`` (see :func:`tokenize_instructions`)."""
    return tokenize_instructions(tokenizer, [row], max_length)[0][0]


def tokenize_instructions(tokenizer: PreTrainedTokenizerBase, rows: Sequence[dict[str, str]],
                          max_length: int) -> tuple[list[tuple[list[int], list[int]]], int]:
    """Every row's ``(input_ids, labels)`` and how many rows were cut at ``max_length``.

    ``input_ids``: prompt + output tokenized with special tokens, truncated to ``max_length``, then
    EOS appended when shorter than ``max_length`` and not already ending in EOS. ``labels``: the ids,
    with the first ``len(tokenize(prompt))`` positions set to -100 (the prompt is not learned).
    Batched: one tokenizer call for the prompts and one for the full texts.
    """
    if max_length < 2:
        raise CorpusError(f"max_length={max_length} must be at least 2 tokens.")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise CorpusError("the tokenizer has no eos_token_id to end each response; set tokenizer.eos_token.")
    prompts = [alpaca_prompt(row["instruction"], row["input"]) for row in rows]
    full = [prompt + row["output"] for prompt, row in zip(prompts, rows)]
    prompt_ids = tokenizer(prompts, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
    full_ids, truncated = _truncated_ids(tokenizer, full, max_length)
    examples = []
    for ids, prompt in zip(full_ids, prompt_ids):
        ids = list(ids)
        if len(ids) < max_length and (not ids or ids[-1] != eos):
            ids.append(eos)
        masked = min(len(prompt), len(ids))
        examples.append((ids, [IGNORE] * masked + ids[masked:]))
    return examples, truncated


def _truncated_ids(tokenizer: PreTrainedTokenizerBase, texts: list[str],
                   max_length: int) -> tuple[list[list[int]], int]:
    """Token ids of ``texts`` as ``tokenizer(..., truncation=True, max_length=max_length)`` gives
    them, and how many were longer: only those are tokenized a second time, with truncation."""
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
    long = [index for index, row in enumerate(ids) if len(row) > max_length]
    if long:
        cut = tokenizer([texts[i] for i in long], add_special_tokens=True, truncation=True,
                        max_length=max_length)["input_ids"]
        for index, row in zip(long, cut):
            ids[index] = row
    return ids, len(long)
