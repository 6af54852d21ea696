"""The papers' samplers, rewritten from their public code for the parity tests, and small local datasets.

Each reference follows its source line by line (only the dataset's location differs: a local file
stands in for the hub id) and returns numpy windows, or EvoPress's list of pieces:

- BlockPruner ``block_search.py`` main + ``utils.get_dataset("alpaca")`` + ``utils.prepare_test_dataloader``;
- MultiPruner ``run_multipruner.py`` main (width rows drawn first, then block rows), same utils;
- SPRINT ``src/utils/data_utils.get_wikitext2`` (train windows) and ``eval_utils.eval_ppl`` (test windows);
- EvoPress ``src/data_utils.get_fineweb_edu`` and ``get_wikitext2(train=False)``.

``transformers.set_seed(seed)`` seeds Python's ``random`` with ``random.seed(seed)``; the references
do just that, restoring the global state afterwards.
"""

from __future__ import annotations

import contextlib
import json
import random
from pathlib import Path

import numpy as np

ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                 "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n{output}")
WORDS = ["the", "river", "valley", "council", "engine", "song", "winter", "battle", "north", "museum", "album",
         "station", "ancient", "record", "league", "bridge", "forest", "college", "empire", "signal"]


@contextlib.contextmanager
def seeded(seed: int):
    """``random.seed(seed)`` as the papers' ``set_seed`` does, the global state restored after."""
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


# ---- local datasets ---------------------------------------------------------------------------------
def _sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + " ."


def write_alpaca(path: Path, rows: int = 90, seed: int = 0) -> Path:
    """Alpaca-format JSONL rows: instruction, input, output and the joined prompt ``text``."""
    rng = random.Random(seed)
    lines = []
    for i in range(rows):
        instruction, output = f"Task {i}: {_sentence(rng, rng.randint(4, 9))}", _sentence(rng, rng.randint(6, 30))
        lines.append(json.dumps({"instruction": instruction, "input": "", "output": output,
                                 "text": ALPACA_PROMPT.format(instruction=instruction, output=output)}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def wikitext_rows(articles: int, seed: int) -> list[str]:
    """WikiText-2-like rows as the hub holds them: headings and paragraphs keep their newline, blank
    lines are empty rows."""
    rng = random.Random(seed)
    rows = []
    for a in range(articles):
        rows += ["", f" = {_sentence(rng, 2)[:-2]} {a} = \n", ""]
        for _ in range(rng.randint(2, 4)):
            rows += [" " + " ".join(_sentence(rng, rng.randint(5, 14)) for _ in range(rng.randint(2, 5))) + " \n", ""]
        rows += [f" = = Section {a} = = \n", "", " " + _sentence(rng, 9) + " \n"]
    return rows


def write_wikitext_raw(path: Path, rows: list[str]) -> Path:
    """The rows as a ``wiki.*.raw`` file: a blank row is a line holding one space."""
    path.write_text("".join(row if row else " \n" for row in rows), encoding="utf-8")
    return path


def write_jsonl(path: Path, rows: list[str]) -> Path:
    path.write_text("\n".join(json.dumps({"text": row}) for row in rows) + "\n", encoding="utf-8")
    return path


def write_fineweb(path: Path, documents: int = 40, seed: int = 0) -> Path:
    """FineWeb-Edu-like documents of very different lengths (a column ``text`` among others)."""
    rng = random.Random(seed)
    lines = [json.dumps({"text": " ".join(_sentence(rng, rng.randint(3, 12)) for _ in range(rng.randint(1, 25))),
                         "id": f"doc-{i}", "score": rng.random()}) for i in range(documents)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ---- the papers' samplers ---------------------------------------------------------------------------
def _get_dataset_alpaca(path: Path):
    """BlockPruner / MultiPruner ``utils.get_dataset("alpaca")`` on a local copy."""
    import datasets

    ds = datasets.load_dataset("json", data_files={"train": str(path)})  # a DatasetDict, as the hub id gives
    ds = ds.remove_columns(["input", "output", "instruction"])
    ds = ds["train"].train_test_split(test_size=0.2, seed=42)
    temp_ds = ds.pop("test")
    temp_ds = temp_ds.train_test_split(test_size=0.5, seed=42)
    ds["test"] = temp_ds["train"]
    ds["validation"] = temp_ds["test"]
    return ds


def _prepare_test_dataloader(dataset, tokenizer, seqlen: int) -> np.ndarray:
    """``utils.prepare_test_dataloader``'s TestDataset input_ids."""
    tokenized_ds = tokenizer("\n\n".join(dataset["text"]), return_tensors="pt")
    nsamples = tokenized_ds.input_ids.numel() // seqlen
    input_ids = tokenized_ds.input_ids[0, : nsamples * seqlen]
    return input_ids.reshape(nsamples, seqlen).numpy()


def blockpruner_calibration(path: Path, tokenizer, nsamples: int, seqlen: int) -> np.ndarray:
    """block_search.py: ``set_seed(42)``; test rows sampled with ``random.sample``; test dataloader."""
    with seeded(42):
        dataset = _get_dataset_alpaca(path)
        test_dataset = dataset["test"]
        sampled_test_dataset = test_dataset.select(random.sample(range(len(test_dataset)), nsamples))
    return _prepare_test_dataloader(sampled_test_dataset, tokenizer, seqlen)


def multipruner_calibration(path: Path, tokenizer, width: int, block: int, seqlen: int) -> tuple[np.ndarray, np.ndarray]:
    """run_multipruner.py: ``set_seed(42)``; the width rows, then the block rows, from one generator."""
    with seeded(42):
        dataset = _get_dataset_alpaca(path)
        test_dataset = dataset["test"]
        test_dataset_width = test_dataset.select(random.sample(range(len(test_dataset)), width))
        test_dataset_block = test_dataset.select(random.sample(range(len(test_dataset)), block))
    return (_prepare_test_dataloader(test_dataset_width, tokenizer, seqlen),
            _prepare_test_dataloader(test_dataset_block, tokenizer, seqlen))


def wikitext2_test(rows: list[str], tokenizer, seqlen: int, special_tokens: bool = True) -> np.ndarray:
    """The WikiText-2 test windows of BlockPruner/MultiPruner (prepare_test_dataloader), SPRINT
    (eval_ppl: ``testenc[:, i*seqlen:(i+1)*seqlen]``) and, without special tokens, EvoPress."""
    testenc = tokenizer("\n\n".join(rows), return_tensors="pt", add_special_tokens=special_tokens).input_ids
    nsamples = testenc.numel() // seqlen
    return np.stack([testenc[0, i * seqlen:(i + 1) * seqlen].numpy() for i in range(nsamples)])


def sprint_calibration(train_rows: list[str], tokenizer, nsamples: int, seed: int, seqlen: int) -> np.ndarray:
    """data_utils.get_wikitext2: train joined with spaces; ``random.randint`` starts after ``random.seed``."""
    trainenc = tokenizer(" ".join(train_rows), return_tensors="pt")
    trainloader = []
    with seeded(seed):
        for _ in range(nsamples):
            i = random.randint(0, trainenc.input_ids.shape[1] - seqlen - 1)
            j = i + seqlen
            trainloader.append(trainenc.input_ids[:, i:j])
    return np.concatenate([t.numpy() for t in trainloader])


def evopress_calibration(path: Path, tokenizer, num_tokens: int, sequence_length: int) -> list[np.ndarray]:
    """data_utils.get_fineweb_edu(train=True) on a local JSONL (streamed, shuffled with seed 0)."""
    from datasets import load_dataset

    dataset = load_dataset("json", data_files={"train": str(path)}, split="train", streaming=True)
    tokens_to_load = num_tokens
    dataset = dataset.shuffle(seed=0, buffer_size=10_000)
    data_iter = iter(dataset)
    data = []
    while tokens_to_load > 0:
        sample = next(data_iter)
        tokenized_sample = tokenizer(sample["text"], return_tensors="pt", add_special_tokens=False).input_ids
        tokenized_sample = tokenized_sample[:, :min(tokenized_sample.shape[1], tokens_to_load)]
        while tokenized_sample.shape[1] > sequence_length:
            data.append(tokenized_sample[:, :sequence_length])
            tokenized_sample = tokenized_sample[:, sequence_length:]
            tokens_to_load -= sequence_length
        data.append(tokenized_sample)
        tokens_to_load -= tokenized_sample.shape[1]
    return [d[0].numpy() for d in data]
