"""The published Llama-2-7B figures the reproduction prints next to rayprune's, each with its source.

Only figures stated in ../shared/SPEC.md §2 or in a published file are here; anything else is None
and the table prints it as ``n/a``. Perplexity is WikiText-2 test at 2048 tokens; averages are the
papers' 5-task zero-shot averages in percent, on the task set named (``actors.zeroshot.TASK_SETS``).
"""

from __future__ import annotations

from dataclasses import dataclass

#: Dense Llama-2-7B parameters (MultiPruner's eval.res.json total_params; SPEC §8: 6.74B).
LLAMA2_7B_PARAMS = 6_738_415_616
#: The architecture the published figures belong to (config.json keys that decide it).
LLAMA2_7B_SHAPE = {"num_hidden_layers": 32, "hidden_size": 4096, "intermediate_size": 11008,
                   "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000}


@dataclass(frozen=True)
class Published:
    """One published row: None where the source gives no figure."""

    ppl: float | None = None
    average: float | None = None  # percent, on ``task_set``
    task_set: str | None = None
    ratio: float | None = None
    params: int | None = None
    hours: float | None = None  # pruning time reported (GPU-hours where the paper says so)
    source: str = ""
    note: str = ""


PUBLISHED: dict[str, Published] = {
    "dense": Published(ppl=5.47, average=68.96, task_set="blockpruner", ratio=0.0, params=LLAMA2_7B_PARAMS,
                       source="SPEC §2 (BlockPruner's table: dense 5.47 / 68.96); params: MultiPruner eval.res.json"),
    "dense (sprint tasks)": Published(task_set="sprint", ratio=0.0, params=LLAMA2_7B_PARAMS,
                                      source="none (SPEC §2 gives no dense figure on SPRINT's task set)"),
    "blockpruner": Published(ppl=11.51, average=60.17, task_set="blockpruner", ratio=0.2199, hours=5.5,
                             source="SPEC §2 (BlockPruner at 21.99%: 11.51 / 60.17; about 5.5 GPU-hours)"),
    "multipruner-published": Published(
        ppl=9.33, average=62.83, task_set="multipruner", ratio=0.219568, params=5_258_874_880,
        source="MultiPruner results/Llama-2-7B/ratio_22/eval.res.json (SPEC §2: 21.96%, 9.33 / 62.83)",
        note="MultiPruner's parameter count keeps removed blocks' norm weights; rayprune's export does not"),
    "multipruner": Published(ppl=9.33, average=62.83, task_set="multipruner", ratio=0.219568, params=5_258_874_880,
                             source="the published MultiPruner row (as above), which rayprune's own search aims at"),
    "sprint": Published(average=66.4, task_set="sprint", hours=0.25,
                        source="SPEC §2 (SPRINT: average 66.4 on PIQA, HellaSwag, ARC-c, ARC-e, BoolQ; 0.25 h)",
                        note="SPEC §2 does not state the speedup of its 66.4 row nor a perplexity; the target "
                             "speedup used here is an assumption (see --sprint-speedup)"),
}

#: SPRINT's target speedup when none is given: the figure of SPRINT's README example
#: ("40% accelerated", --target_speedup 1.41, for Llama-3-8B) and of SPEC §2's "e.g. 1.41x". The
#: Llama-2-7B row of its paper is not in SPEC, so this is a stated assumption, not the paper's row.
SPRINT_SPEEDUP = 1.41
