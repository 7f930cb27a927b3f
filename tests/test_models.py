"""Tests of pydriftn.models against MulensModel, analytic limits and direct integration."""

import warnings

import numpy as np
import pytest
from scipy import integrate

from pydriftn import models

MM = pytest.importorskip("MulensModel")


# ------------------------------------------------------------------ references
def mm_magnification(u, rho, method):
    """MulensModel magnification at separations ``u`` (u0=0, tE=1, t0=0 so u = |t|)."""
    model = MM.Model({"t_0": 0.0, "u_0": 0.0, "t_E": 1.0, "rho": rho})
    model.set_magnification_methods([-1e3, method, 1e3])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.asarray(model.get_magnification(np.asarray(u, dtype=float)))


def disk_average(u, rho, gamma=0.0):
    """Brute-force average of the Paczynski magnification over the source disk.

    2-D integral in polar coordinates centred on the lens (the Jacobian r
    cancels the 1/r singularity of A_ps): for each lens distance r the source
    disk subtends the angles |phi| < arccos((r^2+u^2-rho^2)/(2 r u)), weighted
    by the (linear limb-darkened) surface brightness at distance
    |r e^{i phi} - u| from the source centre. No elliptic integrals involved.
    """

    def brightness(d):
        x = np.clip(1.0 - (d / rho) ** 2, 0.0, None)
        return 1.0 - gamma * (1.0 - 1.5 * np.sqrt(x))

    def a_r(r):  # A_ps(r) * r
        return (r * r + 2.0) / np.sqrt(r * r + 4.0)

    lo, hi = max(0.0, u - rho), u + rho
    pts = [p for p in (rho - u,) if lo < p < hi]
    if gamma == 0.0:

        def f(r):
            if u == 0.0:
                ang = np.pi
            else:
                c = (r * r + u * u - rho * rho) / (2.0 * r * u) if r > 0 else -1.0
                ang = np.arccos(np.clip(c, -1.0, 1.0))
            return a_r(r) * 2.0 * ang

        val, _ = integrate.quad(f, lo, hi, points=pts or None, limit=400, epsabs=0, epsrel=1e-9)
    else:

        def inner(r):
            if u == 0.0:
                phimax = np.pi
            else:
                c = (r * r + u * u - rho * rho) / (2.0 * r * u) if r > 0 else -1.0
                phimax = np.arccos(np.clip(c, -1.0, 1.0))
            g = lambda phi: brightness(np.sqrt(r * r + u * u - 2 * r * u * np.cos(phi)))  # noqa: E731
            v, _ = integrate.quad(g, 0.0, phimax, limit=200, epsrel=1e-9)
            return a_r(r) * 2.0 * v

        val, _ = integrate.quad(inner, lo, hi, points=pts or None, limit=400, epsrel=1e-8)
    return val / (np.pi * rho * rho)


U_GRID = np.array([0.0, 1e-3, 0.01, 0.05, 0.1, 0.3, 0.5, 0.9, 1.0, 1.1, 2.0, 3.0, 5.0, 10.0])
RHO_GRID = np.array([1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0])


# ----------------------------------------------------------------- point source
def test_point_source_paczynski():
    u = np.array([0.1, 0.5, 1.0, 2.0, 10.0])
    model = MM.Model({"t_0": 0.0, "u_0": 0.0, "t_E": 1.0})
    ref = np.asarray(model.get_magnification(u))
    np.testing.assert_allclose(models.point_source_magnification(u), ref, rtol=1e-12)
    assert models.point_source_magnification(1.0) == pytest.approx(3 / np.sqrt(5))
    assert np.isinf(models.point_source_magnification(0.0))


# ------------------------------------------------------------------ finite source
@pytest.mark.parametrize("rho", RHO_GRID)
def test_uniform_matches_mulensmodel_lee09(rho):
    """MulensModel's Lee et al. (2009) uniform-source integration, all u, all rho."""
    u = U_GRID[U_GRID > 0]
    ref = mm_magnification(u, rho, "finite_source_uniform_Lee09")
    ours = models.finite_source_magnification(u, rho)
    np.testing.assert_allclose(ours, ref, rtol=1e-3)


@pytest.mark.parametrize("rho", [0.5, 1.0, 2.0, 5.0, 10.0])
def test_uniform_matches_mulensmodel_wittmao94(rho):
    """MulensModel's Witt & Mao (1994) method (its interpolated elliptic integrals are
    only accurate to ~1e-3 for u >> rho when rho <= 0.1, so compared for rho >= 0.5)."""
    u = np.array([1e-3, 0.1, 0.5, 0.99 * rho, 1.01 * rho, 2.0, 5.0, 10.0])
    ref = mm_magnification(u, rho, "finite_source_uniform_WittMao94")
    np.testing.assert_allclose(models.finite_source_magnification(u, rho), ref, rtol=1e-3)


def test_uniform_matches_brute_force_disk_average():
    """Direct integration over the disk, including u = 0, u = rho and rho >> 1."""
    for rho in [1e-3, 0.05, 0.5, 1.0, 3.0, 10.0]:
        for u in [0.0, 0.3 * rho, rho, 1.7 * rho, rho + 1.0, 10.0]:
            ref = disk_average(u, rho)
            assert models.finite_source_magnification(u, rho) == pytest.approx(ref, rel=1e-6), (u, rho)


def test_analytic_limits():
    rho = np.array([1e-3, 0.01, 0.1, 1.0, 10.0, 100.0])
    # u = 0: A = sqrt(1 + 4/rho^2)
    np.testing.assert_allclose(models.finite_source_magnification(0.0, rho), np.sqrt(1 + 4 / rho**2), rtol=1e-12)
    # just off u = 0 the closed form (not the special case) agrees
    np.testing.assert_allclose(
        models.finite_source_magnification(1e-7 * rho, rho), np.sqrt(1 + 4 / rho**2), rtol=1e-6
    )
    # rho -> 0: Paczynski, smoothly through the series/closed-form switch
    u = np.array([1e-3, 0.01, 0.1, 1.0, 3.0, 10.0])
    for r in [1e-9, 1e-6]:
        np.testing.assert_allclose(
            models.finite_source_magnification(u, r), models.point_source_magnification(u), rtol=1e-5
        )
    np.testing.assert_array_equal(models.finite_source_magnification(u, 0.0), models.point_source_magnification(u))
    # continuity across the series switch u = 10 rho (truncation ~2e-10 there)
    r = 0.01
    lo = models.finite_source_magnification(10 * r * (1 - 1e-14), r)
    hi = models.finite_source_magnification(10 * r * (1 + 1e-14), r)
    assert lo == pytest.approx(hi, rel=1e-9)
    # large rho: A -> 1 + 2/rho^2 inside the source
    for big in [30.0, 100.0, 1000.0]:
        a = models.finite_source_magnification(np.array([0.0, 0.3 * big]), big)
        np.testing.assert_allclose(a - 1.0, 2.0 / big**2, rtol=0.02)


def test_limb_crossing_is_continuous():
    for rho in [1e-4, 0.01, 0.5, 1.0, 7.0]:
        eps = np.array([-1e-6, -1e-10, 0.0, 1e-10, 1e-6])
        a = models.finite_source_magnification(rho * (1 + eps), rho)
        np.testing.assert_allclose(a, a[2], rtol=2e-4)  # log-singular slope at the limb
        assert np.all(np.isfinite(a))
        assert a[2] == pytest.approx(disk_average(rho, rho), rel=1e-6)


def test_vectorised_broadcast_and_shapes():
    u = np.linspace(0, 3, 7)[:, None]
    rho = np.array([0.0, 0.01, 1.0, 5.0])[None, :]
    a = models.finite_source_magnification(u, rho)
    assert a.shape == (7, 4)
    for i in range(7):
        for j in range(4):
            assert a[i, j] == models.finite_source_magnification(float(u[i, 0]), float(rho[0, j])) or (
                np.isinf(a[i, j]) and u[i, 0] == 0 and rho[0, j] == 0
            )
    assert np.isscalar(models.finite_source_magnification(0.5, 0.1))
    with pytest.raises(ValueError, match="rho"):
        models.finite_source_magnification(0.5, -1.0)


@pytest.mark.parametrize("gamma", [0.3, 0.6])
def test_limb_darkening_against_direct_integration(gamma):
    for rho, u in [(0.5, 0.2), (1.0, 1.0), (1.0, 1.6), (5.0, 2.0), (0.05, 0.1)]:
        ref = disk_average(u, rho, gamma=gamma)
        ours = models.finite_source_magnification(u, rho, gamma=gamma)
        assert ours == pytest.approx(ref, rel=1e-3), (u, rho)
    # and roughly against MulensModel's 30-annulus WittMao94 LD (an approximation itself)
    model = MM.Model({"t_0": 0.0, "u_0": 0.0, "t_E": 1.0, "rho": 1.0})
    model.set_magnification_methods([-1e3, "finite_source_LD_WittMao94", 1e3])
    u = np.array([0.2, 0.8, 1.5, 3.0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = np.asarray(model.get_magnification(u, gamma=gamma))
    np.testing.assert_allclose(models.finite_source_magnification(u, 1.0, gamma=gamma), ref, rtol=3e-3)


# ----------------------------------------------------------------------- curves
def test_magnification_curve_and_flux_match_mulensmodel():
    t = np.linspace(-5.0, 5.0, 201)
    params = {"t_0": 0.3, "u_0": 0.2, "t_E": 1.7, "rho": 0.4}
    model = MM.Model(params)
    model.set_magnification_methods([-100.0, "finite_source_uniform_Lee09", 100.0])
    ref = np.asarray(model.get_magnification(t))
    a = models.microlensing_magnification_curve(t, 0.3, 1.7, 0.2, 0.4)
    np.testing.assert_allclose(a, ref, rtol=1e-3)
    f = models.microlensing_flux(t, 0.3, 1.7, 0.2, 0.4, f_source=0.7, f_blend=0.3)
    np.testing.assert_allclose(f, 0.7 * a + 0.3, rtol=1e-12)
    assert np.argmax(a) == np.argmin(np.abs(t - 0.3))


def test_fred_and_flat():
    t = np.linspace(-10, 50, 60001)
    f = models.fred_flare(t, 1.0, 0.5, 0.2, 3.0)
    assert f.max() == pytest.approx(0.5)
    assert t[np.argmax(f)] == pytest.approx(1.0, abs=0.01)
    assert models.fred_flare(1.0 + 3.0, 1.0, 0.5, 0.2, 3.0) == pytest.approx(0.5 / np.e)
    assert models.fred_flare(1.0 - 0.2, 1.0, 0.5, 0.2, 3.0) == pytest.approx(0.5 / np.e)
    # integral = amplitude * (rise + decay)
    assert np.trapezoid(f, t) == pytest.approx(0.5 * 3.2, rel=1e-3)
    np.testing.assert_array_equal(models.flat(t, 2.0), 2.0)
