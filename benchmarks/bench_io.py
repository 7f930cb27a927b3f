"""Benchmark of pydriftn.io: reading full-size DECam CCDs from MEF files.

Run from the repository root::

    python benchmarks/bench_io.py            # 8 full-size CCDs (2046 x 4094), .fits and .fits.fz
    python benchmarks/bench_io.py --nccd 62  # a whole DECam exposure (about 2 GB on disk)

Writes a synthetic multi-extension exposure (float32 sky + noise, int32 dq
codes) to ``bench_output/io/`` (git-ignored) and prints the time to list the
CCDs, read one CCD (first and last: memory mapping makes them cost the same
for plain FITS), read it with its dq mask, and ``describe`` the file, for plain
and tile-compressed files, with the targets beside them.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from astropy.io import fits

from pydriftn import io as pio

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench_output" / "io"
SHAPE = (4094, 2046)
TARGET_READ_S = 0.5  # one CCD (+ mask) well below the per-unit budget (60 CCDs <= 20 s end to end)


def _exposure(path: Path, nccd: int, compressed: bool, seed: int, mask: bool = False):
    if path.exists():
        return path
    rng = np.random.default_rng(seed)
    ph = fits.PrimaryHDU()
    ph.header.update({"EXPTIME": 20.0, "MJD-OBS": 59441.0, "DATE-OBS": "2021-08-15T00:00:00.000",
                      "EXPNUM": 1000001, "FILTER": "VR DECam c0007 6300.0 2600.0", "PIXSCAL1": 0.27,
                      "PIXSCAL2": 0.27, "PLVER": "V5.0"})
    hdus = [ph]
    s = 0.27 / 3600
    for k in range(nccd):
        name = f"S{k + 1}" if k < 31 else f"N{k - 30}"
        if mask:
            arr = np.zeros(SHAPE, np.int32)
            arr[:, 100 + k] = 1
            arr[rng.integers(0, SHAPE[0], 500), rng.integers(0, SHAPE[1], 500)] = 5
        else:
            arr = (160.0 + rng.normal(0, 6.0, SHAPE)).astype(np.float32)
        h = fits.Header({"EXTNAME": name, "GAINA": 4.0, "GAINB": 4.1, "RDNOISEA": 7.0, "RDNOISEB": 7.0,
                         "SATURATA": 42000.0, "SATURATB": 41000.0, "FWHM": 4.0, "AVSKY": 160.0,
                         "CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CRVAL1": 150.0, "CRVAL2": 2.0,
                         "CRPIX1": 1024.0 + 2100 * k, "CRPIX2": 2048.0, "CD1_1": 0.0, "CD1_2": s,
                         "CD2_1": -s, "CD2_2": 0.0})
        hdus.append(fits.CompImageHDU(arr, header=h) if compressed else fits.ImageHDU(arr, header=h))
    pio.write_fits_atomic(fits.HDUList(hdus), path)
    return path


def _time(fn, repeat=3):
    best = np.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nccd", type=int, default=8)
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    for suffix, compressed in ((".fits", False), (".fits.fz", True)):
        t0 = time.perf_counter()
        img = _exposure(OUT / f"bench_{args.nccd}-image{suffix}", args.nccd, compressed, 1)
        _exposure(OUT / f"bench_{args.nccd}-dqmask{suffix}", args.nccd, compressed, 2, mask=True)
        made = time.perf_counter() - t0
        size_mb = img.stat().st_size / 1e6
        ccds = pio.list_ccds(img)
        pio.describe(img)  # warm-up: imports (astropy.wcs, astropy.time, pandas) are not I/O
        t_list, _ = _time(lambda: pio.list_ccds(img))
        t_first, _ = _time(lambda: pio.read_ccd(img, ccds[0]))
        t_last, im = _time(lambda: pio.read_ccd(img, ccds[-1]))
        t_mask, imm = _time(lambda: pio.read_ccd(img, ccds[-1], mask=True))
        t_desc, df = _time(lambda: pio.describe(img))
        print(f"{suffix:9s} {args.nccd} CCDs {SHAPE[1]}x{SHAPE[0]}, {size_mb:7.1f} MB (written in {made:.1f} s)")
        print(f"  list_ccds           {t_list * 1e3:8.1f} ms")
        print(f"  read_ccd first CCD  {t_first * 1e3:8.1f} ms   (target <= {TARGET_READ_S * 1e3:.0f} ms)")
        print(f"  read_ccd last CCD   {t_last * 1e3:8.1f} ms   (target <= {TARGET_READ_S * 1e3:.0f} ms)")
        print(f"  read_ccd + dq mask  {t_mask * 1e3:8.1f} ms   (target <= {TARGET_READ_S * 1e3:.0f} ms); "
              f"{int(imm.bad_pixels().sum())} bad pixels")
        print(f"  describe            {t_desc * 1e3:8.1f} ms   ({len(df)} rows)")
        assert im.data.shape == SHAPE


if __name__ == "__main__":
    main()
