"""What-if placements, best-k and the backtest (pure), on the synthetic points and by hand."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeprobe.advise.pairs import NONE, PairStats, Stat, pair_stats
from edgeprobe.advise.whatif import (
    CandidatesFile,
    Location,
    backtest,
    best_k,
    inflation_for,
    load_candidates,
    load_weights,
    predict,
    what_if,
)
from edgeprobe.configfile import ConfigError
from edgeprobe.probes.geo import floor_rtt_ms
from tests.support import advise_data as data
from tests.unit.advise.test_pairs import icmp, samples


def pair(pop: str, endpoint: str, km: float, inflation: float, **stats: float) -> PairStats:
    fields = {
        name: NONE for name in PairStats.__struct_fields__ if name.endswith(("_ms", "_ratio", "_km", "round_trips"))
    }
    fields.update(distance_km=Stat(km, 30), inflation_ratio=Stat(inflation, 30))
    fields.update({k: Stat(v, 30) for k, v in stats.items()})
    fields.pop("success_ratio", None)
    fields.pop("vs_best_ratio", None)
    fields.pop("vs_best_ms", None)
    return PairStats(
        pop=pop, endpoint=endpoint, tier="", attempts=30, samples=30, ranked=True, success_ratio=1.0, **fields
    )


@pytest.fixture(scope="module")
def pairs() -> list[PairStats]:
    return pair_stats(samples(), icmp(), 20)


@pytest.fixture(scope="module")
def candidates(tmp_path_factory: pytest.TempPathFactory) -> CandidatesFile:
    p = tmp_path_factory.mktemp("c") / "candidates.yaml"
    p.write_text(data.candidates_yaml())
    return load_candidates(p)


def test_inflation_from_paths_of_similar_length() -> None:
    paths = [pair("p", "a", 100, 3.0), pair("p", "b", 900, 1.6), pair("p", "c", 1500, 1.8), pair("p", "d", 6000, 1.4)]
    infl, used = inflation_for(paths, 1000)
    assert [u.endpoint for u in used] == ["b", "c"] and infl == pytest.approx(1.7)
    infl, used = inflation_for(paths, 30)  # nothing within ×2: the nearest in length (log scale)
    assert [u.endpoint for u in used] == ["a"] and infl == 3.0
    assert inflation_for([], 100) is None


def test_prediction_formula_and_its_inputs() -> None:
    paths = [
        pair("p", "a", 500, 1.5, round_trips=3, net_rtt_p50_ms=7.5, network_p50_ms=24.0, server_p50_ms=40.0),
        pair("p", "b", 1200, 1.7, round_trips=3, net_rtt_p50_ms=20.0, network_p50_ms=61.0, server_p50_ms=40.0),
    ]
    pred = predict("p", "x", 800, paths, (40.0, "given"))
    overhead = (24.0 - 3 * 7.5 + 61.0 - 3 * 20.0) / 2  # median of two: their mean
    assert pred.inflation_ratio == pytest.approx(1.6)
    assert pred.round_trips == 3 and pred.round_trips_from == "measured"
    assert pred.overhead_ms == pytest.approx(overhead)
    assert pred.predicted_ttft_p50_ms == pytest.approx(40.0 + overhead + 3 * floor_rtt_ms(800) * 1.6, abs=1e-3)
    assert len(pred.inflation_from) == 2 and pred.inflation_samples == 60 and pred.server_from == "given"
    assert predict("p", "x", 800, paths, (40.0, "given"), round_trips=1).round_trips_from == "candidate"


def test_no_path_to_learn_from_is_said() -> None:
    pred = predict("p", "x", 800, [], (40.0, "given"))
    assert pred.predicted_ttft_p50_ms is None and pred.reason and "inflation" in pred.reason


def test_candidate_at_a_measured_site_is_predicted_within_10_percent(
    pairs: list[PairStats], candidates: CandidatesFile
) -> None:
    """ashburn-2 is where the Ashburn endpoint is: with Ashburn's own data left out, the prediction
    for New York and Chicago (routes of similar inflation nearby) is within 10 % of its measurement."""
    without = [p for p in pairs if p.endpoint != "https://ashburn.example.net/v1"]
    results = {c.name: c for c in what_if(without, candidates, None)}
    measured = {p.pop: p.ttft_p50_ms.value for p in pairs if p.endpoint == "https://ashburn.example.net/v1"}
    for pred in results["ashburn-2"].predictions:
        assert pred.predicted_ttft_p50_ms is not None
        if pred.pop in ("nyc", "chi"):
            m = measured[pred.pop]
            assert m is not None and abs(pred.predicted_ttft_p50_ms - m) / m < 0.10, (pred, m)


def test_candidates_ranked_and_gains(pairs: list[PairStats], candidates: CandidatesFile) -> None:
    results = what_if(pairs, candidates, {"nyc": 1, "chi": 10, "fra": 1})
    assert [r.rank for r in results] == [1, 2, 3]
    assert results[0].name == "chicago-ixp"  # Chicago's users weigh most and wait 77 ms today
    chi = next(p for p in results[0].predictions if p.pop == "chi")
    assert (
        chi.gain_ms is not None
        and chi.gain_ms > 30
        and chi.today_best_endpoint == "https://council-bluffs.example.net/v1"
    )
    london = next(r for r in results if r.name == "london")
    assert all(p.server_ms == 45 and p.server_from == "candidate" for p in london.predictions)


def test_pop_without_coordinates_is_not_predicted(pairs: list[PairStats]) -> None:
    file = CandidatesFile(pops={"nyc": Location(latitude=40.7, longitude=-74.0)}, candidates=load_candidates_list())
    preds = what_if(pairs, file, None)[0].predictions
    assert {p.pop for p in preds if p.predicted_ttft_p50_ms is None} == {"chi", "fra"}
    assert all("coordinates" in (p.reason or "") for p in preds if p.pop != "nyc")


def load_candidates_list() -> list:  # type: ignore[type-arg]
    from edgeprobe.advise.whatif import Candidate

    return [Candidate(name="c", latitude=41.0, longitude=-75.0)]


def test_best_k_with_weights(pairs: list[PairStats], candidates: CandidatesFile) -> None:
    weights = {"nyc": 3.0, "chi": 1.0, "fra": 2.0}
    results = what_if(pairs, candidates, weights)
    one = best_k(pairs, results, 1, weights)
    assert one.steps[0].covered_weight_ratio == 1.0 and one.weights_from == "file"
    three = best_k(pairs, results, 3, weights)
    assert three.method.startswith("exact")
    means = [s.weighted_ttft_p50_ms or 0 for s in three.steps]
    assert means == sorted(means, reverse=True)  # every step helps (or keeps)
    assert {a.pop: a.site for a in three.assignment} == {
        "nyc": "https://nyc-ixp.example.net/v1",
        "fra": "https://fra-ixp.example.net/v1",
        "chi": "chicago-ixp",
    }
    assert next(a for a in three.assignment if a.pop == "chi").predicted
    assert three.today_weighted_ttft_p50_ms is not None
    assert means[-1] < three.today_weighted_ttft_p50_ms  # a Chicago site beats today's Council Bluffs


def test_best_k_greedy_when_too_many_sets(
    pairs: list[PairStats], candidates: CandidatesFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Greedy is what it says: here its first pick (Ashburn, the best single site) is not in the
    best set of three, and it ends above the exact answer."""
    from edgeprobe.advise import whatif

    weights = {"nyc": 3.0, "chi": 1.0, "fra": 2.0}
    results = what_if(pairs, candidates, weights)
    exact = best_k(pairs, results, 3, weights)
    monkeypatch.setattr(whatif, "EXACT_MAX_COMBINATIONS", 0)
    greedy = best_k(pairs, results, 3, weights)
    assert "greedy" in greedy.method and "not guaranteed optimal" in greedy.method
    assert greedy.steps[0].site == "https://ashburn.example.net/v1"
    assert (greedy.steps[-1].weighted_ttft_p50_ms or 0) > (exact.steps[-1].weighted_ttft_p50_ms or 0)


def test_backtest_on_synthetic_data(pairs: list[PairStats]) -> None:
    rows = backtest(pairs)
    assert len(rows) == 11  # every ranked pair
    near = [r for r in rows if r.pop in ("nyc", "chi") and r.endpoint != "https://fra-ixp.example.net/v1"]
    assert all(r.error_ratio is not None and r.error_ratio < 0.10 for r in near), [
        (r.pop, r.endpoint, r.error_ratio) for r in near
    ]
    assert all(r.prediction.server_from.startswith("median of") for r in rows)


def test_candidates_file_errors_name_file_and_key(tmp_path: Path) -> None:
    cases = {
        "pops: {}\ncandidates: []\n": "candidates: expected",
        "pops: {nyc: {latitude: 1}}\ncandidates: [{name: a, latitude: 1, longitude: 2}]\n": (
            "pops.nyc.longitude: required"
        ),
        "pops: {}\ncandidates: [{name: a, latitude: 1, longitude: 2, server_ms: -1}]\n": "candidates[0].server_ms",
        "pops: {}\ncandidates: [{name: a, latitude: 1, longitude: 2, round_trips: 0}]\n": "candidates[0].round_trips",
        "- a\n": "(top level)",
    }
    for i, (text, needle) in enumerate(cases.items()):
        p = tmp_path / f"c{i}.yaml"
        p.write_text(text)
        with pytest.raises(ConfigError) as err:
            load_candidates(p)
        assert str(err.value).startswith(f"{p}: {needle}"), str(err.value)


def test_weights_file(tmp_path: Path) -> None:
    p = tmp_path / "w.yaml"
    p.write_text("nyc: 3\nchi: 1.5\n")
    assert load_weights(p) == {"nyc": 3.0, "chi": 1.5}
    for text, needle in (("nyc: -1\n", "nyc"), ("nyc: many\n", "nyc"), ("nyc: 0\n", "above 0"), ("{}\n", "above 0")):
        p.write_text(text)
        with pytest.raises(ConfigError, match=needle):
            load_weights(p)
