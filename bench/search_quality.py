"""Benchmark: which search finds the best mask at a given ratio, and what it costs (issue "Search beyond greedy").

    .venv/bin/python bench/search_quality.py                 # every entry not measured yet, then the table
    .venv/bin/python bench/search_quality.py --only evolution@0.11 --fresh
    .venv/bin/python bench/search_quality.py --recount      # tokens of measured entries, from their caches

SmolLM2-135M, configs/demo.yaml with 32 x 128 calibration tokens (4,096; batch 2) and the demo's
16 x 256 held-out tokens, 2 evaluator actors x 1 CPU, fp32. Each entry is one campaign in its own run
directory ``runs/bench-quality/<entry>``, run in its own process (the code of the moment), and its
figures are kept in ``result.json`` there: a rerun measures only what is missing (a stopped
measurement goes on from its run directory's cache), so the hours this takes on 2 cores can be
spread over several sittings.

Work shared between entries is reused, not repeated, and still counted:

- ``donor``: the entry's cache starts as a copy of the donor's (a greedy run to a lower ratio is the
  prefix of the one to a higher ratio; a warm-started search starts from greedy's run at its ratio);
- tokens: every calibration row the campaign used, computed or served from that copy, each once
  however often the search read it (``Counters.tokens_by_set``): the compute the method needs from
  a cold start;
- wall: this campaign's, plus its donor's (whose work it reused).

An audit entry (not a row of the table) replays a racing entry with ``search.racing.audit`` on its
cache and BlockPruner's at the same ratio: the exact step's scores come from BlockPruner's rows up to
the first decision racing changed, so it forwards nothing where racing kept BlockPruner's path, and
the table names every decision it changed.

Section ``<!-- search-quality -->`` of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from results import write_section

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "runs" / "bench-quality"
MARKER = "<!-- search-quality -->"
SEQUENCES, LENGTH, BATCH, ACTORS = 32, 128, 2, 2
HELDOUT_ROW = 16 * 255  # tokens of a held-out row (16 x 256 windows); no calibration row has as many
RATIOS = (0.11, 0.22)
# kv_weight=once: the channel order the first entries were measured with (before MultiPruner's n_rep
# weighting became the default), so every entry's model fingerprint, and the caches they share, match.
COMMON = [f"data.calibration={{sequences: {SEQUENCES}, length: {LENGTH}, seed: 0}}", f"search.batch_size={BATCH}",
          "export=false", "search.kv_weight=once"]
RACING = ["search.racing.windows=4", "search.racing.keep=3"]
RACING_ROUNDS = ["search.racing.windows=[4,8,16]", "search.racing.keep=3"]
NO_PROBES, PROBES = "search.racing.probes=0", "search.racing.probes=1"
# (name, settings, donor): a probed race starts from the cache of the same race without probes (its
# rounds are the same up to the first decision a probe changes), its wall time added to its own
RACES = (("racing", (*RACING, NO_PROBES), "racing"), ("racing rounds", (*RACING_ROUNDS, NO_PROBES), "racing rounds"),
         ("racing+probes", (*RACING, PROBES), "racing"), ("racing rounds+probes", (*RACING_ROUNDS, PROBES),
                                                          "racing rounds"))
EVOLUTION = ["search.method=evolution", "search.evolution.offspring=16", "search.evolution.first_windows=4",
             "search.evolution.survivors=2", "search.evolution.generations=60"]
TPE = ["search.method=optuna", "search.sampler=tpe", "search.warm_start=blockpruner", "search.trials=64"]
KL = ["search.fitness=kl"]


@dataclass(frozen=True)
class Entry:
    method: str  # the table's name
    ratio: float
    overrides: tuple[str, ...] = ()
    donor: str | None = None  # an entry whose cache this one starts from (its work is reused and counted)
    also: tuple[str, ...] = ()  # further entries whose caches it reads (an audit's: the exact scores)

    @property
    def audit(self) -> bool:
        return "search.racing.audit=true" in self.overrides

    @property
    def name(self) -> str:
        return f"{self.method}@{self.ratio}"


def entries() -> list[Entry]:
    """In the order they run: every method at the low ratio first (the high one reuses it)."""
    out: list[Entry] = []
    for low, ratio in zip((None, *RATIOS), RATIOS):
        out += [
            Entry("blockpruner", ratio, donor=low and f"blockpruner@{low}"),
            Entry("evolution", ratio, tuple(EVOLUTION), donor=f"blockpruner@{ratio}"),
            # at the high ratio, 4x the generations (a quarter of EvoPress's k (n - k) / 1.5): the first 60
            # replay from the cache of the entry above (offspring come from a seeded generator)
            *([Entry("evolution 240 generations", ratio, (*EVOLUTION, "search.evolution.generations=240"),
                     donor=f"evolution@{ratio}")] if ratio == RATIOS[-1] else []),
            *(Entry(racing, ratio, tuple(settings),
                    donor=f"{donor}@{ratio}" if donor != racing else low and f"{racing}@{low}")
              for racing, settings, donor in RACES),
            *(Entry(f"{racing} audit", ratio, (*settings, "search.racing.audit=true"), donor=f"{racing}@{ratio}",
                    also=(f"blockpruner@{ratio}",)) for racing, settings, _ in RACES),
            Entry("tpe", ratio, tuple(TPE), donor=f"blockpruner@{ratio}"),
            Entry("evolution+widths", ratio, (*EVOLUTION, "search.widths=true"), donor=f"blockpruner@{ratio}"),
            Entry("blockpruner kl", ratio, tuple(KL), donor=low and f"blockpruner kl@{low}"),
            Entry("evolution kl", ratio, (*EVOLUTION, *KL), donor=f"blockpruner kl@{ratio}"),
            # the block stage to the high ratio begins with the low one's blocks: its cache serves them
            Entry("multipruner", ratio, ("search.method=multipruner",), donor=low and f"multipruner@{low}"),
        ]
    return out


def directory(name: str) -> Path:
    return RUNS / name.replace(" ", "-").replace("+", "-").replace("@", "-at-")


def result(name: str) -> dict | None:
    file = directory(name) / "result.json"
    return json.loads(file.read_text()) if file.is_file() else None


def measure(entry: Entry, fresh: bool = False) -> dict:
    """Run one entry's campaign (in this process) and keep its figures in ``result.json``. A run
    directory left by a stopped measurement is resumed (its wall time then counts this part only,
    and the table marks it), unless ``fresh``."""
    from orchestrator.campaign import Campaign

    run_dir = directory(entry.name)
    resumed = (run_dir / "evals").is_dir()  # a stopped measurement goes on from its cache
    if fresh:
        shutil.rmtree(run_dir, ignore_errors=True)
        resumed = False
    donor = result(entry.donor) if entry.donor else None
    for other in [n for n in (entry.donor, *entry.also) if n] if not resumed else []:
        if result(other) is None:
            raise SystemExit(f"{entry.name} reads the cache of {other}, which has not run yet: run it first")
        shutil.copytree(directory(other) / "evals", run_dir / "evals", dirs_exist_ok=True)
    t0 = time.perf_counter()
    outcome = Campaign(config(entry), progress=False).run()
    wall = time.perf_counter() - t0
    path = json.loads((run_dir / "path.json").read_text())
    last = path["steps"][-1]
    search = json.loads((run_dir / "search.json").read_text()) if (run_dir / "search.json").exists() else {}
    figures = {
        "method": entry.method, "ratio_target": entry.ratio, "donor": entry.donor,
        "ratio": last["ratio"], "calibration": last["ppl"], "heldout": path["heldout"]["pruned_ppl"],
        "heldout_greedy": path["heldout"].get("greedy_ppl"), "dense_heldout": path["heldout"]["dense_ppl"],
        "tokens": outcome.counters.tokens_by_set.get("calibration", 0), "wall_own": wall,
        "wall": wall + (donor["wall"] if donor else 0.0), "resumed": resumed, "mask": path_mask(path),
        "evolution": {k: search.get(k) for k in ("generations", "evaluations", "tokens", "greedy_ppl", "best_ppl")}
        if search.get("method") == "evolution" else None,
        "changed": [{"step": i + 1, "racing": s["changed"]["racing"], "exact": s["changed"]["exact"],
                     "racing_ppl": s["changed"]["racing_ppl"], "exact_ppl": s["changed"]["exact_ppl"]}
                    for i, s in enumerate(search["racing"]["steps"]) if "changed" in s] if entry.audit else None,
        "evaluated": outcome.counters.evaluated,
        "date": time.strftime("%Y-%m-%d"),
    }
    (run_dir / "result.json").write_text(json.dumps(figures, indent=1))
    return figures


def config(entry: Entry):
    from orchestrator.config_load import load_config

    run_dir = directory(entry.name)
    return load_config(ROOT / "configs" / "demo.yaml", [
        f"name=bench-quality-{run_dir.name}", f"output={run_dir}", f"cluster.actors={ACTORS}",
        f"search.target_ratio={entry.ratio}", *COMMON, *entry.overrides])


def recount(entry: Entry) -> dict:
    """Count a measured entry's calibration tokens again from its cache: every row once (its wall
    time is kept). Every row of an entry's cache is one its campaign used: the donor's rows are its
    warm start or the prefix of its own path. The held-out rows (16 x 255 tokens) are left out."""
    from orchestrator.cache import EvalCache

    figures = result(entry.name)
    rows = {r["key"]: r for r in EvalCache(directory(entry.name) / "evals", flush_every=None).rows()
            if r["status"] == "ok"}
    figures["tokens"] = sum(int(r["tokens"]) for r in rows.values() if int(r["tokens"]) != HELDOUT_ROW)
    (directory(entry.name) / "result.json").write_text(json.dumps(figures, indent=1))
    return figures


def steps(name: str) -> list[tuple[str, int]]:
    """The removal path of an entry's campaign: (kind, layer) per step."""
    path = json.loads((directory(name) / "path.json").read_text())
    return [(s["kind"], s["layer"]) for s in path["steps"]]


def path_mask(path: dict) -> str:
    from orchestrator.rundir import final_mask

    mask = final_mask(path)
    widths = len(mask.head_units) + len(mask.mlp_width)
    return (f"{len(mask.attn_removed)} attn + {len(mask.mlp_removed)} MLP removed"
            + (f", {widths} narrowed" if widths else ""))


def write_table() -> None:
    rows = [(e, result(e.name)) for e in entries()]
    done = [(e, r) for e, r in rows if r and not e.audit]
    lines = ["## Search quality: every method at about 11% and 22% (`bench/search_quality.py`)", "",
             f"SmolLM2-135M, configs/demo.yaml with {SEQUENCES} x {LENGTH} calibration tokens ({SEQUENCES * LENGTH:,}; "
             f"batch {BATCH}), held-out 16 x 256 tokens, {ACTORS} evaluator actors x 1 CPU, fp32, this machine "
             "(2 cores). Racing: round 1 on 4 windows, the best 3 (and any within the margin) on all 32; racing "
             "rounds: the same cut after rounds on 4, 8 and 16 windows, each with its own margin; +probes: each cut "
             "also sends its best cut candidate on to all windows (`search.racing.probes: 1`, the default; the "
             "entries without were measured before probes existed), starting from the same race's cache "
             "without probes, whose wall time is added. TPE: 64 "
             "trials, warm-started from BlockPruner's mask, proposals kept at or above its ratio. Evolution: 16 "
             "offspring per generation on 4 windows, the best 2 on all 32, 60 generations (at 0.22 also 240), from "
             "BlockPruner's mask; with widths, per-layer levels of head units and MLP channel groups. KL: fitness mean "
             "KL(dense || mask) per token, perplexity reported. Tokens: calibration tokens of every row the "
             "campaign used (each once, however often read), including its warm start's (the compute from a "
             "cold start). Wall: the campaign's, "
             "plus the run it reused (the warm start, or the same greedy search to the lower ratio); "
             "\"resumed\": measured in two sittings, the wall time of the second only. The 2 cores were "
             "shared with other work during some entries, so wall times are indicative; tokens are the compute.", "",
             "| ratio | method | ratio reached | mask | calibration ppl | held-out ppl | tokens | wall |",
             "|---:|---|---:|---|---:|---:|---:|---:|"]
    for entry, r in done:
        calibration = (f"exp(KL) {r['calibration']:.4f}" if "kl" in entry.method else f"{r['calibration']:.3f}")
        lines.append(f"| {entry.ratio:.2f} | {entry.method} | {r['ratio']:.4f} | {r['mask']} | {calibration} | "
                     f"{r['heldout']:.3f} | {r['tokens']:,} | {r['wall'] / 60:.1f} min{' (resumed)' if r.get('resumed') else ''} |")
    for ratio in RATIOS:
        greedy = result(f"blockpruner@{ratio}")
        for name, start, fitness in (("evolution", "blockpruner", ""), ("evolution 240 generations", "blockpruner", ""),
                                     ("evolution kl", "blockpruner kl", " with KL fitness")):
            evo, start_result = result(f"{name}@{ratio}"), result(f"{start}@{ratio}")
            if not (start_result and evo):
                continue
            gain = start_result["heldout"] - evo["heldout"]
            generations = json.loads((directory(f"{name}@{ratio}") / "search.json").read_text())["generations"]
            calibration = (f"exp(KL) {evo['calibration']:.4f} vs {start_result['calibration']:.4f}" if fitness
                           else f"{evo['calibration']:.3f} vs {start_result['calibration']:.3f}")
            lines += ["", f"At {ratio:.2f}, evolution on blocks{fitness} ({generations} generations) "
                      f"{'beat' if gain > 0 else 'did not beat'} BlockPruner{fitness} at the same ratio "
                      f"on held-out text: {evo['heldout']:.3f} vs {start_result['heldout']:.3f} ({gain:+.3f}), with "
                      f"{evo['tokens'] / start_result['tokens']:.2f}x BlockPruner's tokens ({evo['tokens']:,}); on the "
                      f"calibration windows {calibration}"
                      + ("." if gain > 0 else "; its lower calibration score did not carry over to held-out text."
                         if evo["calibration"] < start_result["calibration"] else closest(f"{name}@{ratio}"))]
        for racing, _, _ in RACES:
            raced = result(f"{racing}@{ratio}")
            if greedy and raced:
                path = steps(f"{racing}@{ratio}")
                same = path == steps(f"blockpruner@{ratio}")
                lines += ["", f"At {ratio:.2f}, {racing} {'took' if same else 'did not take'} BlockPruner's path "
                          f"({'the same' if same else 'another'} {len(path)} steps) with "
                          f"{greedy['tokens'] / raced['tokens']:.2f}x fewer tokens ({raced['tokens']:,} vs "
                          f"{greedy['tokens']:,}); held-out {raced['heldout']:.3f} vs {greedy['heldout']:.3f}."
                          + probe_sentence(f"{racing}@{ratio}")
                          + audit_sentence(result(f"{racing} audit@{ratio}"), raced, greedy)]
        for method in ("blockpruner", "evolution"):
            ppl, kl = result(f"{method}@{ratio}"), result(f"{method} kl@{ratio}")
            if ppl and kl:
                lines += ["", f"At {ratio:.2f}, {method} with KL fitness: held-out {kl['heldout']:.3f} at ratio "
                          f"{kl['ratio']:.4f} vs {ppl['heldout']:.3f} at {ppl['ratio']:.4f} with perplexity fitness "
                          f"({kl['mask']} vs {ppl['mask']}), {kl['tokens']:,} vs {ppl['tokens']:,} tokens."]
    missing = [e.name for e, r in rows if not r]
    if missing:
        lines += ["", "Not measured yet: " + ", ".join(missing) + "."]
    write_section(MARKER, lines)


def closest(name: str) -> str:
    """Why an evolution entry kept the greedy mask: how near its best offspring came."""
    history = json.loads((directory(name) / "search.json").read_text())["history"]
    best = min((g for g in history if math.isfinite(g["best_offspring_ppl"])), key=lambda g: g["best_offspring_ppl"],
               default=None)
    if best is None:
        return "; no offspring scored a finite perplexity."
    return (f"; no offspring beat the parent, the closest (generation {best['generation']}) scored "
            f"{best['best_offspring_ppl']:.3f} on all windows against {best['parent_ppl']:.3f}.")


def probe_sentence(name: str) -> str:
    """How often a racing entry's probes were chosen: the decisions its cuts alone would have lost."""
    racing = json.loads((directory(name) / "search.json").read_text())["racing"]
    if not racing.get("probes"):
        return ""
    won = racing["probe_won"]
    return (f" Probes: {sum(s['probes'] for s in racing['steps'])} in {len(racing['steps'])} steps; "
            + (f"{won} step{'s were' if won != 1 else ' was'} won by a probe." if won
               else "no step was won by a probe."))


def audit_sentence(audit: dict | None, raced: dict, greedy: dict) -> str:
    """What the audit of a racing entry found, and what racing's path cost on held-out text."""
    from orchestrator.report_search import mask_difference

    if audit is None:
        return ""
    changed = audit["changed"]
    found = (f" The audit ({audit['evaluated']} masks forwarded beyond the two caches) found "
             f"{len(changed)} changed decision{'s' if len(changed) != 1 else ''}")
    if not changed:
        return found + "."
    return (found + ": " + "; ".join(
        f"step {c['step']}, racing removed {mask_difference(c['racing'], c['exact'])} (calibration "
        f"{c['racing_ppl']:.3f}) where the exact step removes {mask_difference(c['exact'], c['racing'])} "
        f"({c['exact_ppl']:.3f})" for c in changed)
            + f"; racing's path costs {raced['heldout'] - greedy['heldout']:+.3f} held-out perplexity.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated entries, e.g. 'evolution@0.11' (default: every one)")
    parser.add_argument("--fresh", action="store_true", help="measure again from a cold start, even entries that "
                        "have a result (default: measure what is missing, resuming a stopped measurement)")
    parser.add_argument("--recount", action="store_true", help="count the tokens of measured entries again, "
                        "from their caches (each row once)")
    parser.add_argument("--entry", help=argparse.SUPPRESS)  # one entry, in this process
    args = parser.parse_args()
    by_name = {e.name: e for e in entries()}
    if args.entry:
        figures = (recount if args.recount else measure)(by_name[args.entry], *([] if args.recount else [args.fresh]))
        print(json.dumps(figures))
        return
    wanted = args.only.split(",") if args.only else list(by_name)
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        raise SystemExit(f"unknown entries {unknown}; the entries are: {', '.join(by_name)}")
    for name in wanted:
        if (result(name) is not None) != args.recount and not args.fresh:
            continue  # measure what is missing; recount what is measured
        print(f"=== {name}", flush=True)
        flags = ["--fresh"] if args.fresh else ["--recount"] if args.recount else []
        subprocess.run([sys.executable, __file__, "--entry", name, *flags], check=True)
        write_table()
    write_table()


if __name__ == "__main__":
    main()
