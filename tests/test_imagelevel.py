"""Image-level injection-recovery (events rendered by the simulator, recovered by the whole chain)."""

import json

import numpy as np
import pandas as pd
import pytest

from pydriftn.events.imagelevel import (ImageCell, image_level_efficiency, magnified_half_span_s, peak_observed,
                                        wilson_interval)
from pydriftn.events.series import EventSearchError


def test_wilson_interval_reference_values():
    # Wilson (1927) score interval, 95 %: 8/10 -> [0.4902, 0.9433]; 0/20 -> [0, 0.1611]
    lo, hi = wilson_interval(8, 10, 0.95)
    assert lo == pytest.approx(0.4902, abs=2e-4) and hi == pytest.approx(0.9433, abs=2e-4)
    lo, hi = wilson_interval(0, 20, 0.95)
    assert lo == 0.0 and hi == pytest.approx(0.1611, abs=2e-4)
    lo, hi = wilson_interval(20, 20, 0.6827)
    assert hi == 1.0 and 0.9 < lo < 1.0
    assert np.isnan(wilson_interval(0, 0)[0])


def test_peak_observed_only_within_the_stars_usable_samples():
    from pydriftn import flags

    # two exposures of 37 samples of 0.54 s, 48 s apart (a 28 s gap); star 1 on the CCD in both, star 2 off
    # the CCD for the second half of exposure 1 and BLENDED in exposure 2, star 3 flagged but with a NaN flux
    dt, day = 0.54, 86400.0
    rows = []
    for e, t_start in ((1, 0.0), (2, 48.0)):
        for k in range(37):
            t = t_start + (k + 0.5) * dt
            rows.append((1, e, t, 1.0, 0))
            if e == 1 and k < 18:
                rows.append((2, e, t, 1.0, 0))
            if e == 2:
                rows.append((2, e, t, 1.0, int(flags.BLENDED)))
            rows.append((3, e, t, np.nan if e == 1 else 1.0, 0))
    lc = pd.DataFrame(rows, columns=["star_id", "expnum", "t", "norm_flux", "flags"])
    lc["mjd"] = 60000.0 + lc["t"] / day
    t0 = np.array([10.0, 30.0, 60.0, 20.05, 19.9, 5.0, 15.0, 60.0, 10.0, 60.0, 10.0]) / day + 60000.0
    star = pd.array([1, 1, 1, 1, 1, 2, 2, 2, 3, 3, None], dtype="Int64")
    want = [True, False, True, False, True, True, False, False, False, True, False]
    got = peak_observed(star, t0, lc)
    # star 1: last sample of exposure 1 at 19.71 s, + half a sample = 19.98 s: 19.9 s in, 20.05 s out; 30 s is
    # in the gap; star 2: samples to 9.45 s in exposure 1 (then off the CCD), BLENDED in exposure 2
    assert list(got) == want
    # without the BLENDED bit in the mask, star 2's exposure 2 counts
    got2 = peak_observed(star, t0, lc, bad_flag_mask=int(flags.COSMIC_RAY))
    assert got2[7] and list(np.delete(got2, 7)) == list(np.delete(want, 7))
    # with the event parameters: a sample within the half-maximum of the event as the samples see it (the
    # event's and the smearing kernel's, 3.7 x 1.052 px = 1.05 s half width, in quadrature) + half a sample,
    # or samples on both sides while A >= 1.1. tE = 1 s: reach 1.33 s, so 20.05 s (0.34 s past star 1's last
    # sample) counts, star 2 at 15 s (5.5 s past its last one) does not
    n = len(t0)
    short = peak_observed(star, t0, lc, None, np.full(n, 1.0), np.full(n, 0.1), np.full(n, 0.01))
    assert list(short) == [True, False, True, True, True, True, False, False, False, True, False]
    # tE = 30 s: reach 5 s, and magnified by >= 1.1 for 50 s either side: the peak at 30 s (in the gap) is
    # bracketed by star 1's samples; star 2 at 60 s (50.6 s after its last usable sample, none after) and star 3
    # at 10 s (no usable sample before) are not
    long_ = peak_observed(star, t0, lc, None, np.full(n, 30.0), np.full(n, 0.1), np.full(n, 0.01))
    assert list(long_) == [True, True, True, True, True, True, False, False, False, True, False]


def test_magnified_half_span_is_the_point_lens_value():
    # point source: A(u) = 1.1 at u^2 = 2 A / sqrt(A^2 - 1) - 2; half span tE sqrt(u^2 - u0^2)
    a = 1.1
    u = np.sqrt(2 * a / np.sqrt(a * a - 1) - 2)
    got = magnified_half_span_s([30.0, 3.0], [0.1, 0.5], [1e-4, 1e-4])
    np.testing.assert_allclose(got, [30 * np.sqrt(u * u - 0.01), 3 * np.sqrt(u * u - 0.25)], rtol=2e-3)
    # a large source (rho = 1) magnifies for longer (A ~ 2.2 over the disk crossing) and never below u0 = 0 ...
    assert magnified_half_span_s(10.0, 0.1, 1.0)[0] > 10 * np.sqrt(u * u - 0.01)
    # ... and a source far from the lens is never magnified by 1.1
    assert magnified_half_span_s(10.0, 5.0, 0.01)[0] == 0.0


def test_bad_cell_is_a_typed_error(tmp_path):
    with pytest.raises(EventSearchError, match="kind"):
        image_level_efficiency(tmp_path, cells=[{"te_s": 3, "u0": 0.1, "rho": 0.01, "kind": "medium"}])
    with pytest.raises(EventSearchError, match="cell specification"):
        image_level_efficiency(tmp_path, cells=[{"te_s": 3, "u": 0.1}])


@pytest.fixture(scope="module")
def strong_cell(tmp_path_factory):
    """tE = 10 s, u0 = 0.1 events on r 16-18 stars: a peak magnification of 10 for ~20 s, Delta-chi2 in the
    thousands, which the series-level injection finds with near-certainty. One small CCD, 2 exposures, a
    sparse field (r <= 21) so that few event stars are lost to blends."""
    out = tmp_path_factory.mktemp("imagelevel")
    cell = ImageCell(10.0, 0.1, 0.01, r_min=16.0, r_max=18.0)
    res = image_level_efficiency(out, cells=[cell], preset="small", ccds=("S4",), n_exposures=2,
                                 n_stars_per_ccd=150, events_per_ccd=8, sim_overrides={"r_max": 21.0},
                                 workers=1, n_series=10, seed=1)
    return out, cell, res


def test_strong_events_are_found_through_the_images(strong_cell):
    out, cell, res = strong_cell
    inj = res.injections
    truth = pd.read_parquet(out / "cells" / cell.key / "rep0" / "sim" / "truth" / "events.parquet")
    assert len(inj) == len(truth) >= 5
    assert np.allclose(truth["te_s"], 10.0) and np.allclose(truth["u0"], 0.1) and set(truth["kind"]) == {"short"}
    # the events are on the catalogue stars at the true positions, and most have searchable samples
    assert inj["in_catalogue"].mean() >= 0.8
    searchable = inj[inj["searchable"]]
    assert len(searchable) >= max(4, 0.6 * len(inj))
    # every searchable one has a candidate above threshold with t0 within 0.5 s and tE within 30 % of the truth
    assert searchable["above_threshold"].all(), searchable[["sim_id", "statistic", "dt0_s"]]
    assert (searchable["dt0_s"].abs() <= 0.5).all(), searchable["dt0_s"].to_numpy()
    assert ((searchable["te_ratio"] - 1).abs() <= 0.3).all(), searchable["te_ratio"].to_numpy()
    # and is found, unless vetoed because image pixels in the event were masked (a cosmic ray or a satellite
    # on the trail at the peak: the store flags those samples and the search will not trust the window)
    vetoed = searchable[searchable["vetoes"] != 0]
    assert set(vetoed["veto_reasons"]) <= {"flagged_samples"}, vetoed["veto_reasons"].tolist()
    assert len(vetoed) <= 1
    assert searchable.loc[searchable["vetoes"] == 0, "found"].all()
    assert int(inj["found"].sum()) == len(searchable) - len(vetoed)


def test_efficiency_table_counts_and_intervals(strong_cell):
    out, cell, res = strong_cell
    t = pd.read_csv(out / "efficiency_image.csv")
    assert list(t["level"]) == ["image", "series"]
    im = t[t["level"] == "image"].iloc[0]
    assert im["n_injected"] == len(res.injections)
    assert im["n_found"] == int(res.injections["found"].sum())
    assert im["n_searchable"] == int(res.injections["searchable"].sum())
    assert t.loc[t["level"] == "series", "n_injected"].iloc[0] == 10
    for _, r in t.iterrows():
        assert 0 <= r["n_found"] <= r["n_detected"] <= r["n_injected"]
        assert r["efficiency"] == pytest.approx(r["n_found"] / r["n_injected"])
        assert r["efficiency_lo"] <= r["efficiency"] <= r["efficiency_hi"]
        assert r["detection_lo"] <= r["detection_efficiency"] <= r["detection_hi"]
        assert 0 <= r["n_found_searchable"] <= r["n_searchable"] <= r["n_injected"]
        assert r["efficiency_searchable_lo"] <= r["efficiency_searchable"] <= r["efficiency_searchable_hi"]
        assert r["te_s"] == 10.0 and r["u0"] == 0.1
    assert im["n_found_searchable"] == im["n_found"]  # an event on a star without searchable samples is not found
    # peak-observed events (peak time within the star's usable samples) are on searchable stars; these short
    # events peak 20-80 % into an exposure, so nearly all searchable ones had their peak recorded
    inj = res.injections
    assert im["n_peak_observed"] == int(inj["peak_observed"].sum()) <= im["n_searchable"]
    assert not (inj["peak_observed"] & ~inj["searchable"]).any()
    assert inj.loc[inj["searchable"], "peak_observed"].mean() >= 0.8
    assert im["n_found_peak_observed"] == int((inj["found"] & inj["peak_observed"]).sum())
    assert im["efficiency_peak_observed_lo"] <= im["efficiency_peak_observed"] <= im["efficiency_peak_observed_hi"]
    assert any("of peak-observed" in line for line in res.summary_lines())
    assert (out / "efficiency_image.png").stat().st_size > 1000
    # the simulated images are removed after the run, the truth is kept
    rep = out / "cells" / cell.key / "rep0"
    assert not list((rep / "sim").glob("night_*/*.fits")) and (rep / "sim" / "truth" / "stars.parquet").is_file()


def test_rerun_resumes_the_cell(strong_cell):
    out, cell, res = strong_cell
    meta = out / "cells" / cell.key / "rep0" / "cell.json"
    before = meta.stat().st_mtime_ns
    again = image_level_efficiency(out, cells=[cell], preset="small", ccds=("S4",), n_exposures=2,
                                   n_stars_per_ccd=150, events_per_ccd=8, sim_overrides={"r_max": 21.0},
                                   workers=1, n_series=10, seed=1, plot=False)
    assert meta.stat().st_mtime_ns == before
    pd.testing.assert_frame_equal(again.table, res.table)
    assert json.loads(meta.read_text())["params"]["cell"]["te_s"] == 10.0
    # research=True: the cached pipeline run is searched again (not simulated or run again), same results
    run_mtime = (out / "cells" / cell.key / "rep0" / "run" / "catalogue" / "master_catalogue.parquet").stat().st_mtime_ns
    inj_mtime = (out / "cells" / cell.key / "rep0" / "injections.parquet").stat().st_mtime_ns
    re = image_level_efficiency(out, cells=[cell], preset="small", ccds=("S4",), n_exposures=2,
                                n_stars_per_ccd=150, events_per_ccd=8, sim_overrides={"r_max": 21.0},
                                workers=1, n_series=10, seed=1, plot=False, research=True)
    assert (out / "cells" / cell.key / "rep0" / "injections.parquet").stat().st_mtime_ns > inj_mtime
    assert (out / "cells" / cell.key / "rep0" / "run" / "catalogue" / "master_catalogue.parquet"
            ).stat().st_mtime_ns == run_mtime
    pd.testing.assert_frame_equal(re.table, res.table)


def test_simulator_event_kind_pins_the_kind_and_parameters(tmp_path):
    from pydriftn.errors import ConfigError
    from pydriftn.simulate import make_config, simulate_dataset

    with pytest.raises(ConfigError, match="event_kind"):
        make_config("tiny", event_kind="medium")
    with pytest.raises(ConfigError, match="u0_range"):
        make_config("tiny", u0_range=(0.5, 0.1))
    # the default is not written to simulation.json (default datasets unchanged)
    assert "event_kind" not in make_config("small").to_dict()
    assert make_config("small", event_kind="long").to_dict()["event_kind"] == "long"
    ds = simulate_dataset(tmp_path / "long", preset="tiny", seed=4, n_stars_per_ccd=300, events_per_ccd=3,
                          event_kind="long", long_te_range_s=(30.0, 30.0), u0_range=(0.2, 0.2),
                          rho_range=(0.05, 0.05), cr_rate_per_mpix_s=0.0, flashes_per_ccd_exposure=0)
    ev = ds.read_truth("events")
    assert len(ev) == 3 and set(ev["kind"]) == {"long"}
    assert np.allclose(ev["te_s"], 30.0) and np.allclose(ev["u0"], 0.2) and np.allclose(ev["rho"], 0.05)
    # t0 of a long event: anywhere from the first exposure's start to the last one's end
    meta = json.loads(ds.simulation_json.read_text())
    mjd0 = min(e["mjd_obs"] for e in meta["exposures"])
    mjd1 = max(e["mjd_obs"] for e in meta["exposures"]) + 20.0 / 86400.0
    assert ((ev["t0_mjd"] >= mjd0) & (ev["t0_mjd"] <= mjd1)).all()
    assert meta["config"]["event_kind"] == "long"
