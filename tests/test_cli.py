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
