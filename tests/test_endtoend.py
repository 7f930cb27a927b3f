"""The whole chain against simulator truth: ``run_pipeline`` on the ``small`` preset, then every product
(catalogue, fitted WCS, forced positions, trail table, the light-curve store, the event search, the
classification) compared with the truth tables.

The pipeline runs once per module; the evaluation is the one of ``benchmarks/bench_endtoend.py``
(which prints the same figures at full size). Thresholds are the issue targets, loosened where the
small preset has few objects (a handful of events, flashes, satellites; ~25 isolated r < 19 stars).
Catalogue star IDs are mapped to the simulator's by the nearest true star within 0.5".
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_endtoend", REPO / "benchmarks" / "bench_endtoend.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench():
    return _bench()


@pytest.fixture(scope="module")
def chain(sim_small, bench, tmp_path_factory):
    """Run the pipeline on the small preset once (one worker) and evaluate it against truth."""
    out = tmp_path_factory.mktemp("endtoend")
    res, seconds = bench.run_chain(sim_small, out, workers=1)
    assert res.exit_code == 0, res.summary_lines()
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        fig = bench.evaluate(sim_small, out, search=True)
    return res, fig


def test_every_unit_processed(sim_small, chain):
    res, fig = chain
    assert res.n_done == len(sim_small.expnums) * len(sim_small.config.ccds)
    assert len(fig["units"]) == res.n_done


def test_catalogue_completeness(chain):
    _, fig = chain
    # every resolvable true star r < 21 on the CCD is in the catalogue (within 0.5"); unresolved pairs
    # (a brighter star within 1") may be missing
    assert fig["n_catalogue_resolvable"] > 150
    assert fig["catalogue_completeness_resolvable"] >= 0.97
    assert fig["catalogue_completeness"] >= 0.95
    assert fig["catalogue_unmatched"] <= 0.02 * fig["n_catalogue"]


def test_fitted_wcs_against_true_positions(chain):
    _, fig = chain
    for u in fig["units"]:
        assert u["n_true_stars"] >= 20
        # the fitted WCS at the true t = 0 positions; the exposure's mean jitter (0.07" rms per axis OU
        # process, in the images but not in the truth positions) is allowed for in the raw figure
        assert u["rms_true_minus_jitter"] <= 0.05, u
        assert u["rms_true"] <= 0.06, u


def test_forced_trail_positions(chain):
    _, fig = chain
    assert fig["n_forced_checked"] > 150
    assert fig["forced_median_px"] < 0.25
    assert fig["forced_p95_px"] < 0.6
    # no systematic along-track shift (it would be a timing error: 1 px = 0.54 s)
    assert abs(fig["forced_along_mean_px"]) < 0.05
    assert fig["forced_along_rms_px"] < 0.3 and fig["forced_cross_rms_px"] < 0.3


def test_detection_and_identification(chain):
    _, fig = chain
    # every true S/N >= 10 trail whose star is catalogued has a row; identification: each measured row
    # lies nearest to the true trail of the star its catalogue ID maps to
    assert fig["detection_catalogued"] >= 0.99, fig["missed_detection"]
    assert fig["identification"] >= 0.99, fig["wrong_id"]
    assert fig["id_unmapped"] == 0


@pytest.mark.xfail(strict=False, reason="catalogue from the pointed g/r images misses ~2-3 % of true stars, "
                   "all of them companions 0.4-4.3\" from another (mostly brighter) star (small seed 0: S4 (94.4, 778.6) "
                   "r=20.6 at 1.86\" from r=18.8; N4 (19.3, 397.3) r=19.5 at 2.57\" from r=16.1), which the drift "
                   "trails show at S/N 10-120; so end-to-end detection of S/N >= 10 trails is 95-98 % < 99 % "
                   "(the astrometry stage finds 100 % of the catalogued ones)")
def test_detection_end_to_end(chain):
    _, fig = chain
    assert fig["detection_resolvable"] >= 0.99


def test_extraction_bias_through_the_chain(chain):
    _, fig = chain
    assert fig["n_bias"] > 100
    # store flux (e-/s per sample) summed over the good samples vs the true flux those samples saw
    assert abs(fig["bias"]) < 0.01
    # and vs the exposure total of the truth (counts_e over EXPTIME), transparency changes aside
    assert abs(fig["bias_total"]) < 0.015


def test_precision_and_pulls_through_the_chain(chain):
    _, fig = chain
    assert fig["n_iso"] >= 15
    # normalised series about the true (PSF-smoothed) light curve, in units of the reported errors
    assert 0.75 <= fig["scatter_ratio"] <= 1.15
    assert 0.9 <= fig["pulls"] <= 1.1
    assert fig["bad_levels"] == 0 and fig["n_valid"] > 1000


def test_store_time_axis(chain):
    _, fig = chain
    for ta in fig["time_axis"]:
        # sample k is the strip k..k+1 px along the true trail: its mid-time in the store
        assert abs(ta["mjd_offset_s"]) < 0.01 and ta["mjd_offset_max_s"] < 0.02, ta
        assert abs(ta["dt_store"] / ta["dt_true"] - 1) < 1e-3, ta


def test_microlensing_peak_time(chain):
    _, fig = chain
    short = [e for e in fig["events_timing"] if e["kind"] == "short"]
    assert short, "the small preset (seed 0) has short events peaking inside an exposure"
    for e in short:
        assert e["in_store"], e
        assert abs(e["offset_s"]) <= 0.1, e


def test_event_search_no_unexplained_false_candidates(chain, bench):
    _, fig = chain
    s = fig["search"]["default"]
    assert s["n_star_nights"] > 400
    # detections on stars without an event: only stars hosting a true flash are tolerated
    unexplained = [f for f in s["false"] if not f["flash_host"]]
    assert not unexplained, unexplained


def test_event_search_recovers_strong_events(chain):
    """Every strong event is found, also the small preset's tE 2.9 s event on a star with a faint unresolved
    neighbour 3.2" away (BLEND_MINOR: searched; it was excluded while any such neighbour made a star BLENDED)."""
    _, fig = chain
    s = fig["search"]["default"]
    strong = [e for e in s["events"] if e["dchi2_store"] > 3 * s["threshold"]]
    assert strong
    assert all(e["recovered"] for e in strong), strong


def test_flashes_and_cosmic_rays(chain):
    _, fig = chain
    assert fig["fl_n"] >= 8
    assert fig["flash_recovery"] >= 0.9, fig["missed_flashes"]
    assert fig["cr_n"] >= 20
    assert fig["cosmic_ray_recovery"] >= 0.97


def test_star_trails_rarely_misclassified(chain):
    _, fig = chain
    assert fig["tr_n"] > 500
    assert fig["trail_misclassified"] <= 0.01, fig["bad_trails"]


def test_satellites(chain):
    _, fig = chain
    assert fig["sat_n"] >= 1
    # the long streak across S4 of the first exposure is found as a line
    assert fig["sat_line"] >= 1


def test_event_search_as_user_has_no_false_candidates(chain):
    _, fig = chain
    s = fig["search"]["as_user"]
    assert s["n_false"] == 0, s["false"]
