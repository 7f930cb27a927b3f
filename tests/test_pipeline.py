"""The pipeline a user runs: complete outputs, resumable after SIGKILL, executor-independent."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from pydriftn.config import config_from_dict
from pydriftn.pipeline import query_store, run_pipeline

OUTPUT_SUFFIXES = (".csv", ".parquet")


@pytest.fixture(scope="module")
def two_nights(tmp_path_factory):
    """Two nights x three exposures of the tiny preset."""
    from pydriftn.simulate import simulate_dataset

    return simulate_dataset(tmp_path_factory.mktemp("two_nights"), preset="tiny", seed=3,
                            n_nights=2, n_exposures=3)


def _config(ds, out, **extra):
    d = Path(ds.out_dir)
    data = {
        "drifts_dirs": [str(d / "night_1"), str(d / "night_2")],
        "output_dir": str(out),
        "g_image": str(ds.pointed_images["g"]),
        "r_image": str(ds.pointed_images["r"]),
        "gaia": str(ds.gaia_reference),
        "workers": 1,
        "classify": {"save_cutouts": False},
    }
    data.update(extra)
    return data


def _outputs(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.suffix in OUTPUT_SUFFIXES}


@pytest.fixture(scope="module")
def reference_run(two_nights, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference_run")
    result = run_pipeline(config_from_dict(_config(two_nights, out)), progress=False)
    return out, result


def test_outputs_complete_and_consistent(two_nights, reference_run):
    out, result = reference_run
    assert result.exit_code == 0, result.summary_lines()
    assert result.n_done == 6
    for night in ("night_1", "night_2"):
        exps = sorted(int(p.stem.split("_")[-1]) for p in (out / night).glob("driftastrom-exp_*.csv"))
        assert len(exps) == 3
        for e in exps:
            for kind in ("driftastrom", "driftskysub", "driftextract"):
                assert (out / night / f"{kind}-exp_{e}.csv").is_file()
    assert (out / "extractions.pdf").is_file() and (out / "extractions-median.pdf").is_file()
    assert (out / "catalogue" / "master_catalogue.csv").is_file()
    # wide CSV: ID columns + extraction_0..N, one row per extracted star, users' column names
    wide = pd.read_csv(next((out / "night_1").glob("driftextract-exp_*.csv")))
    ext_cols = [c for c in wide.columns if c.startswith("extraction_")]
    assert len(ext_cols) >= 20  # full-illumination samples of a 37-px trail
    assert {"star_id", "ref_star_id", "chp"} <= set(wide.columns)
    # star IDs are the catalogue's, so the same star has the same ID in every exposure
    cat = pd.read_parquet(out / "catalogue" / "master_catalogue.parquet")
    assert set(wide["star_id"]) <= set(cat["star_id"])
    # the store holds every star-sample, queryable with SQL
    n = query_store(out, "SELECT count(*) AS n, count(DISTINCT expnum) AS e, "
                         "count(DISTINCT night) AS nights FROM lightcurves")
    assert int(n["e"][0]) == 6 and int(n["nights"][0]) == 2 and int(n["n"][0]) > 1000
    med = query_store(out, "SELECT star_id, expnum, median(norm_flux) AS m FROM lightcurves "
                           "WHERE norm_flux IS NOT NULL GROUP BY 1, 2")
    assert np.all(med["m"] > 0.5) and abs(np.median(med["m"]) - 1) < 0.02


def test_rerun_resumes_everything_and_is_identical(two_nights, reference_run, tmp_path):
    out, _ = reference_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    cfg = config_from_dict(_config(two_nights, copy))
    result = run_pipeline(cfg, progress=False)
    assert {u.status for u in result.units} == {"resumed"}
    assert _outputs(copy) == _outputs(out)


def test_sigkill_then_rerun_gives_identical_outputs(two_nights, reference_run, tmp_path):
    out_ref, _ = reference_run
    out = tmp_path / "killed"
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(_config(two_nights, out)))
    proc = subprocess.Popen([sys.executable, "-m", "pydriftn.cli", "-q", "run", str(cfg_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    # kill it after the first unit is complete, while the others are under way
    while time.time() < deadline and proc.poll() is None:
        if len(list(out.glob("night_*/units/*/*/done.json"))) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list(out.glob("night_*/units/*/*/done.json")))
    assert 1 <= done_before < 6
    result = run_pipeline(config_from_dict(_config(two_nights, out)), progress=False)
    statuses = [u.status for u in result.units]
    assert statuses.count("resumed") == done_before and statuses.count("done") == 6 - done_before
    assert _outputs(out) == _outputs(out_ref)


def test_bad_file_is_skipped_and_reported(two_nights, tmp_path):
    d = Path(two_nights.out_dir)
    night = tmp_path / "night_x"
    shutil.copytree(d / "night_1", night)
    victim = sorted(night.glob("*-image.fits"))[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 3])  # truncated
    cfg = _config(two_nights, tmp_path / "out")
    cfg["drifts_dirs"] = [str(night)]
    result = run_pipeline(config_from_dict(cfg), progress=False)
    assert result.exit_code == 1
    assert any(victim.name in s.what for s in result.skipped_inputs) or any(
        u.status == "skipped" and victim.name in u.reason for u in result.units)
    assert result.n_done == 2
    text = "\n".join(result.summary_lines())
    assert "skipped" in text and victim.name in text


def test_dask_local_cluster_gives_the_same_store(two_nights, reference_run, tmp_path):
    pytest.importorskip("distributed")
    out_ref, _ = reference_run
    out = tmp_path / "dask"
    cfg = config_from_dict(_config(two_nights, out, executor="dask", workers=2))
    result = run_pipeline(cfg, progress=False)
    assert result.n_done == 6
    ref = _outputs(out_ref)
    got = _outputs(out)
    assert got.keys() == ref.keys()
    assert got == ref


def test_demo_chain_on_tiny_preset(tmp_path):
    from pydriftn.cli import main

    code = main(["-q", "demo", str(tmp_path / "demo"), "--preset", "tiny", "--workers", "1"])
    assert code in (0, 1)
    out = tmp_path / "demo" / "output"
    assert list((out / "night_1").glob("driftextract-exp_*.csv"))
    assert (out / "demo-extractions.pdf").is_file()
    assert (out / "search" / "candidates.parquet").is_file()  # the run ends with the event search
    assert (tmp_path / "demo" / "demo.yaml").is_file()


def test_target_list_restricts_extraction_csv(two_nights, reference_run, tmp_path):
    out_ref, _ = reference_run
    cat = pd.read_parquet(out_ref / "catalogue" / "master_catalogue.parquet")
    wide = pd.read_csv(next((out_ref / "night_1").glob("driftextract-exp_*.csv")))
    chosen = cat[cat["star_id"].isin(wide["star_id"])].head(3)
    targets = tmp_path / "targets.csv"
    # targets given 0.3" off the catalogue position, as from another survey
    pd.DataFrame({"name": ["a", "b", "c"], "ra": chosen["ra"] + 0.3 / 3600 / np.cos(np.radians(chosen["dec"])),
                  "dec": chosen["dec"]}).to_csv(targets, index=False)
    out = tmp_path / "targets_run"
    shutil.copytree(out_ref / "catalogue", out / "catalogue")
    cfg = config_from_dict(_config(two_nights, out, read_targets=True, targets=str(targets)))
    result = run_pipeline(cfg, progress=False)
    assert result.n_done == 6
    files = sorted((out / "night_1").glob("target-driftextract-exp_*.csv"))
    assert len(files) == 3 and not list((out / "night_1").glob("driftextract-exp_*.csv"))
    got = pd.read_csv(files[0])
    assert set(got["star_id"]) == set(chosen["star_id"])


def test_report_pages_and_cutout_marks_the_event(two_nights, reference_run, tmp_path):
    """The report's drift-image cutout of a truth event is the exposure holding t0, and its t0 marker sits
    where the simulator put the star at t0 (the position along a trail is the time)."""
    from pydriftn.events import SearchResult
    from pydriftn.events.report import candidate_cutouts, write_report

    out, _ = reference_run
    events = pd.read_parquet(two_nights.truth["events"])
    ev = events[events["kind"] == "short"].iloc[0]
    truth_star = pd.read_parquet(two_nights.truth["stars"]).set_index("star_id").loc[ev["star_id"]]
    cat = pd.read_parquet(out / "catalogue" / "master_catalogue.parquet")
    dist = np.hypot((cat["ra"] - truth_star["ra"]) * np.cos(np.radians(truth_star["dec"])),
                    cat["dec"] - truth_star["dec"]) * 3600.0
    assert dist.min() < 0.5
    star_id = int(cat["star_id"].iloc[int(np.argmin(dist))])
    lc = query_store(out, f"SELECT * FROM lightcurves WHERE star_id = {star_id}")
    t0 = float(ev["t0_mjd"])
    # the exposure that holds t0, from the store's sample times
    spans = lc.groupby("expnum")["mjd"].agg(["min", "max"])
    holding = spans[(spans["min"] - 1.5 / 86400 <= t0) & (spans["max"] + 1.5 / 86400 >= t0)].index.tolist()
    assert len(holding) == 1
    night = lc.loc[lc["expnum"] == holding[0], "night"].iloc[0]
    cand = {"star_id": star_id, "night": night, "ccd": ev["ccd"], "model": "microlensing",
            "statistic": 100.0, "false_alarm_prob": 1e-6, "above_threshold": True, "vetoes": 0, "veto_reasons": "",
            "window_start_mjd": t0 - 2.0 / 86400, "window_end_mjd": t0 + 2.0 / 86400, "t0_mjd": t0,
            "te_s": float(ev["te_s"]), "u0": float(ev["u0"]), "rho": float(ev["rho"]), "fs": 1.0, "base": 1.0}

    cutouts = candidate_cutouts(out, lc, cand)
    marked = [c for c in cutouts if c["at_t0"] is not None]
    assert [c["expnum"] for c in marked] == holding
    c = marked[0]
    tr = pd.read_parquet(two_nights.truth["trails"])
    tr = tr[(tr["expnum"] == holding[0]) & (tr["star_id"] == ev["star_id"])].iloc[0]
    open_mjd = float((lc.loc[lc["expnum"] == holding[0], "mjd"] - lc.loc[lc["expnum"] == holding[0], "t_s"] / 86400)
                     .median())
    frac = (t0 - open_mjd) * 86400 / 20.0
    x_true = tr["x_start"] + frac * (tr["x_end"] - tr["x_start"])
    y_true = tr["y_start"] + frac * (tr["y_end"] - tr["y_start"])
    assert np.hypot(c["at_t0"][0] - x_true, c["at_t0"][1] - y_true) < 1.5
    # the cutout holds the trail, and is image data around it
    x0, y0 = c["origin"]
    assert 0 <= c["at_t0"][0] - x0 < c["image"].shape[1] and 0 <= c["at_t0"][1] - y0 < c["image"].shape[0]

    res = SearchResult(candidates=pd.DataFrame([cand]), star_nights=pd.DataFrame({"star_id": [star_id]}))
    eff = tmp_path / "eff"
    eff.mkdir()
    pd.DataFrame({"te_s": [1.0, 10.0], "n_injected": [10, 10], "n_detected": [3, 9]}).to_csv(
        eff / "efficiency.csv", index=False)
    files = write_report(res, lc, tmp_path / "report", run_dir=out, efficiency_dir=eff)
    pdf = (tmp_path / "report" / "report.pdf").read_bytes()
    assert pdf.startswith(b"%PDF") and pdf.count(b"/Type /Page") - pdf.count(b"/Type /Pages") >= 3
    page = (tmp_path / "report" / "report.html").read_text()
    png = f"candidate_{cand['night']}_{cand['ccd']}_{star_id}.png"
    assert png in page and (tmp_path / "report" / png).is_file() and "efficiency.csv" in page
    assert all(Path(f).is_file() for f in files)


def test_star_columns_follow_each_sample_star():
    """Level, blend fraction and blend flags reach every sample of their star, in any sample order."""
    from pydriftn.flags import SampleFlag
    from pydriftn.pipeline.stages import _add_star_columns

    stars = pd.DataFrame({"star_id": [7, 3, 9], "level_e_s": [10.0, 20.0, 30.0],
                          "star_flags": np.array([0, int(SampleFlag.BLENDED), int(SampleFlag.BLEND_MINOR) | 1],
                                                 np.int32),
                          "blend_fraction": [0.0, 0.5, 0.01]})
    aligned = {"star_id": np.repeat([7, 3, 9], 4), "flags": np.full(12, 2, np.int32)}
    _add_star_columns(aligned, stars)
    assert aligned["level_e_s"].dtype == np.float64 and aligned["blend_fraction"].dtype == np.float32
    np.testing.assert_array_equal(aligned["level_e_s"], np.repeat([10.0, 20.0, 30.0], 4))
    # only the blend bits of the star flags are carried; the samples' own flags are kept
    np.testing.assert_array_equal(aligned["flags"], np.repeat([2, 2 | int(SampleFlag.BLENDED),
                                                               2 | int(SampleFlag.BLEND_MINOR)], 4))
    assert aligned["flags"].dtype == np.int32
    # shuffled samples, and one of a star the table lacks: matched by star_id
    rng = np.random.default_rng(0)
    sid = np.r_[rng.permutation(np.repeat([7, 3, 9], 4)), 11]
    other = {"star_id": sid, "flags": np.full(13, 2, np.int32)}
    _add_star_columns(other, stars)
    lev = {7: 10.0, 3: 20.0, 9: 30.0}
    np.testing.assert_array_equal(other["level_e_s"][:-1], [lev[s] for s in sid[:-1]])
    assert np.isnan(other["level_e_s"][-1]) and np.isnan(other["blend_fraction"][-1]) and other["flags"][-1] == 2
    np.testing.assert_array_equal(other["flags"][:-1] & int(SampleFlag.BLENDED), np.where(sid[:-1] == 3,
                                                                                          int(SampleFlag.BLENDED), 0))


_REUSE_SCRIPT = """
import resource, sys
import numpy as np
if sys.argv[1] == "init":
    from pydriftn.pipeline.run import _worker_init
    _worker_init()
a = np.ones(16 * 2**20, np.float32)  # 64 MB, freed and allocated again as a unit's arrays are
del a
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
b = np.ones(16 * 2**20, np.float32)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_worker_init_keeps_freed_image_memory_for_reuse():
    """In a pool worker a freed image-sized array's pages are reused (no new page faults), not returned
    to the kernel and faulted in (and zeroed) again."""
    faults = {}
    for mode in ("init", "default"):
        res = subprocess.run([sys.executable, "-c", _REUSE_SCRIPT, mode], capture_output=True, text=True, check=True)
        faults[mode] = int(res.stdout.split()[-1])
    assert faults["init"] < 20, faults
    assert faults["default"] > faults["init"] + 20, faults  # (the effect the worker set-up removes)


def test_sorted_union_of_pixel_indices_equals_numpy_union():
    from pydriftn.pipeline.stages import _sorted_union

    rng = np.random.default_rng(5)
    a = np.sort(rng.choice(10**6, 5000, replace=False))
    b = np.sort(rng.choice(10**6, 7000, replace=False))
    c = rng.choice(10**6, 300)  # unsorted, with repeats
    np.testing.assert_array_equal(_sorted_union(a, b, c), np.union1d(np.union1d(a, b), c))
    assert _sorted_union(np.zeros(0, np.int64), a).dtype == np.int64
    assert len(_sorted_union(np.zeros(0, np.int64))) == 0


@pytest.mark.parametrize("executor", ["local", "dask"])
def test_worker_log_records_reach_the_run_log_file(two_nights, tmp_path, executor):
    """A unit skipped inside a worker process is logged in the run's log file (not only on its stderr)."""
    from astropy.io import fits

    if executor == "dask":
        pytest.importorskip("distributed")

    night = tmp_path / "night_x"
    shutil.copytree(Path(two_nights.out_dir) / "night_1", night)
    victim = sorted(night.glob("*-image.fits"))[0]
    with fits.open(victim) as hdul:
        for hdu in hdul:
            if hdu.data is not None:
                hdu.data = np.full_like(hdu.data, 100.0)  # a blank exposure: no trails, no astrometry
        hdul.writeto(victim, overwrite=True)
    cfg = _config(two_nights, tmp_path / "out", workers=2, executor=executor)
    cfg["drifts_dirs"] = [str(night)]
    result = run_pipeline(config_from_dict(cfg), progress=False)
    skipped = [u for u in result.units if u.status == "skipped"]
    assert skipped and result.n_done >= 1
    text = (tmp_path / "out" / "pydriftn.log").read_text()
    for u in skipped:  # the worker's own warning, relayed (the summary lines are logged at DEBUG)
        assert any("WARNING" in line and f"{u.key} skipped:" in line for line in text.splitlines()), text[-2000:]
