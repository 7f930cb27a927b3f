"""The CLI: --version, --help on every subcommand, one-line errors."""

import subprocess
import sys

import pytest

from pydriftn import __version__
from pydriftn.cli import build_parser, main


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_every_subcommand_has_help(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"demo", "run", "simulate", "catalogue", "config", "query", "search", "efficiency"} <= set(sub.choices)
    for name in sub.choices:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        assert "usage: pydriftn " + name in capsys.readouterr().out


def test_config_error_is_one_line(tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text("drifts_dir: [x]\n")
    code = main(["run", str(f)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "did you mean 'drifts_dirs'" in err[0]


def test_console_script_entry_point():
    out = subprocess.run([sys.executable, "-m", "pydriftn.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and __version__ in out.stdout


def test_info_on_real_cutout(cutouts_dir, capsys):
    img = cutouts_dir / "c4d_181104_072440_ooi_g_ls9.S4.fits"
    assert main(["-q", "info", str(img)]) == 0
    out = capsys.readouterr().out
    assert "S4" in out and "140" in out  # the CCD and its EXPTIME


def test_catalogue_command_on_real_cutouts(cutouts_dir, tmp_path, capsys):
    g = cutouts_dir / "c4d_181104_072440_ooi_g_ls9.S4.fits"
    r = cutouts_dir / "c4d_171113_061941_ooi_r_ls9.S4.fits"
    code = main(["-q", "catalogue", str(g), str(r), "--ccds", "S4", "--out", str(tmp_path)])
    assert code == 0
    assert "stars written" in capsys.readouterr().out
    import pandas as pd

    cat = pd.read_csv(tmp_path / "master_catalogue.csv")
    assert len(cat) > 0 and {"star_id", "ra", "dec"} <= set(cat.columns)


def test_missing_image_is_one_line(tmp_path, capsys):
    code = main(["-q", "info", str(tmp_path / "nope.fits")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "nope.fits" in err[0]


@pytest.mark.parametrize("option, value", [("--false-alarm-rate", "2"), ("--scrambles", "0")])
def test_search_option_out_of_range_is_one_line(tmp_path, capsys, option, value):
    code = main(["search", str(tmp_path), option, value])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and option in err[0]


def test_efficiency_image_level_excludes_store(tmp_path, capsys):
    code = main(["efficiency", str(tmp_path / "eff"), "--image-level", "--store", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--image-level" in err[0]
