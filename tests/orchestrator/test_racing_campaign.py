"""Racing on a tiny model with real Ray actors: the exact campaign's path, an audit that agrees, and
never more tokens forwarded than the exact campaign."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from orchestrator.cache import EvalCache
from orchestrator.campaign import Campaign
from tests.tiny import tiny_campaign_config, tiny_run_setup

pytestmark = pytest.mark.ray

DATA = {"data.calibration": "{sequences: 8, length: 24, seed: 0}", "search.target_ratio": 0.3, "export": "false"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_run_setup(tmp_path_factory.mktemp("racing"))


def calibration_tokens(run_dir, heldout_fp: str) -> int:
    """Tokens the campaign forwarded on calibration windows (whole set and segments), from its cache."""
    return sum(int(r["tokens"]) for r in EvalCache(run_dir / "evals", flush_every=None).rows()
               if r["calibration_fp"] != heldout_fp)


def test_racing_on_real_actors_keeps_the_path_or_names_the_change_and_forwards_no_more(ray_session, setup):
    exact = Campaign(tiny_campaign_config(setup, "exact", **DATA), progress=False).run()
    raced = Campaign(tiny_campaign_config(setup, "raced", **DATA, **{"search.racing.windows": 2,
                                                                     "search.racing.keep": 2}), progress=False).run()
    audited = Campaign(tiny_campaign_config(setup, "audited", **DATA, **{
        "search.racing.windows": 2, "search.racing.keep": 2, "search.racing.audit": "true"}), progress=False).run()
    paths = [json.loads((r.run_dir / "path.json").read_text()) for r in (exact, raced, audited)]
    steps = [[(s["kind"], s["layer"]) for s in p["steps"]] for p in paths]
    search = json.loads((audited.run_dir / "search.json").read_text())["racing"]
    changed = [s for s in search["steps"] if "changed" in s]
    if steps[1] == steps[0]:
        assert not changed  # the audit found nothing racing changed
        assert [s["ppl"] for s in paths[1]["steps"]] == pytest.approx([s["ppl"] for s in paths[0]["steps"]], rel=1e-9)
    else:  # a changed decision is named, with the exact choice's lower perplexity
        assert changed and all(c["changed"]["exact_ppl"] <= c["changed"]["racing_ppl"] for c in changed)
    assert steps[2] == steps[1]  # the audit does not change racing's decisions
    # A tiny random model's candidates lie within a few percent of each other: round 1 cannot tell most of
    # them apart, so most go on to round 2 (SmolLM2's spread is wide: bench/racing.py). Round 2 forwards
    # only the windows round 1 did not, so racing never forwards more than the exact campaign.
    race = json.loads((raced.run_dir / "search.json").read_text())["racing"]
    assert race["finalists"] <= race["candidates"] == sum(s["candidates"] for s in race["steps"])
    heldout_fp = {r["calibration_fp"] for r in EvalCache(exact.run_dir / "evals", flush_every=None).rows()
                  if r["tokens"] == 3 * 31}  # the held-out windows: 3 x 32
    assert len(heldout_fp) == 1
    fp = heldout_fp.pop()
    assert calibration_tokens(raced.run_dir, fp) <= calibration_tokens(exact.run_dir, fp)


def test_an_audit_from_the_exact_and_raced_caches_forwards_only_past_a_changed_decision(ray_session, setup):
    """The audit of a finished racing campaign, on a copy of its cache and the exact campaign's
    (``bench/search_quality.py`` does this): every step's exact scores come from the exact campaign's
    whole-set rows up to the first decision racing changed, so an audit of a racing run that kept the
    exact path forwards nothing."""
    exact = Campaign(tiny_campaign_config(setup, "exact", **DATA), progress=False).run()  # replayed
    raced = Campaign(tiny_campaign_config(setup, "raced", **DATA, **{"search.racing.windows": 2,
                                                                     "search.racing.keep": 2}), progress=False).run()
    config = tiny_campaign_config(setup, "audit-from-caches", **DATA, **{
        "search.racing.windows": 2, "search.racing.keep": 2, "search.racing.audit": "true"})
    for donor in (exact, raced):
        shutil.copytree(donor.run_dir / "evals", Path(config.output) / "evals", dirs_exist_ok=True)
    audited = Campaign(config, progress=False).run()
    steps = [[(s["kind"], s["layer"]) for s in json.loads((r.run_dir / "path.json").read_text())["steps"]]
             for r in (exact, raced, audited)]
    assert steps[2] == steps[1]
    changed = [i for i, s in enumerate(json.loads((audited.run_dir / "search.json").read_text())["racing"]["steps"])
               if "changed" in s]
    if steps[1] == steps[0]:
        assert not changed and audited.counters.evaluated == 0  # every score from the two caches
    else:  # the exact path's rows answer up to the first changed step; the later steps' are new
        assert changed and 0 < audited.counters.evaluated


def test_racing_in_rounds_on_real_actors_decides_on_full_scores(ray_session, setup):
    exact = Campaign(tiny_campaign_config(setup, "exact", **DATA), progress=False).run()  # the first test's: replayed
    rounds = Campaign(tiny_campaign_config(setup, "rounds", **DATA, **{"search.racing.windows": "[2, 4]",
                                                                       "search.racing.keep": 1}),
                      progress=False).run()
    exact_first = json.loads((exact.run_dir / "path.json").read_text())["steps"][0]
    race = json.loads((rounds.run_dir / "search.json").read_text())["racing"]
    assert race["windows"] == [2, 4] and all(1 <= len(s["rounds"]) <= 2 for s in race["steps"])
    assert all(s["rounds"][0] == s["candidates"] for s in race["steps"])  # every candidate in round 1
    path = json.loads((rounds.run_dir / "path.json").read_text())["steps"]
    if (path[0]["kind"], path[0]["layer"]) == (exact_first["kind"], exact_first["layer"]):
        assert path[0]["ppl"] == pytest.approx(exact_first["ppl"], rel=1e-9)  # decided on all windows' score
    fp = {r["calibration_fp"] for r in EvalCache(exact.run_dir / "evals", flush_every=None).rows()
          if r["tokens"] == 3 * 31}.pop()
    assert calibration_tokens(rounds.run_dir, fp) <= calibration_tokens(exact.run_dir, fp)
