"""Configuration: one clear line per problem, original key names kept."""

import pytest
import yaml

from pydriftn.config import PipelineConfig, config_from_dict, example_yaml, load_config
from pydriftn.errors import ConfigError


def test_example_round_trips_to_defaults():
    data = yaml.safe_load(example_yaml())
    cfg = config_from_dict(data)
    assert cfg.drift_rate_arcsec_s == (0.0, 0.5)
    assert cfg.sky.radius == PipelineConfig.model_fields["sky"].default_factory().radius
    assert cfg.img_keyword == "image" and cfg.mask_keyword == "dqmask"


def test_typo_gets_did_you_mean():
    with pytest.raises(ConfigError, match=r"unknown key 'drifts_dir' \(did you mean 'drifts_dirs'\?\)"):
        config_from_dict({"drifts_dir": ["a"], "drifts_dirs": ["a"]})


def test_nested_typo_names_section():
    with pytest.raises(ConfigError, match=r"unknown key 'sky.radus' \(did you mean 'radius'\?\)"):
        config_from_dict({"drifts_dirs": ["a"], "sky": {"radus": 3}})


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError, match=r"workers: .*integer.*\(got 'many'\)"):
        config_from_dict({"drifts_dirs": ["a"], "workers": "many"})


def test_bad_drift_rate():
    with pytest.raises(ConfigError, match="drift_rate_arcsec_s.*zero"):
        config_from_dict({"drifts_dirs": ["a"], "drift_rate_arcsec_s": [0, 0]})


def test_original_aliases():
    cfg = config_from_dict({"drifts_dirs": ["a"], "photometry_catalogue": "cat.csv"})
    assert str(cfg.catalogue) == "cat.csv"


def test_missing_folder_and_image(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text(yaml.safe_dump({"drifts_dirs": ["nope/"], "g_image": "g.fits", "r_image": "r.fits"}))
    with pytest.raises(ConfigError) as err:
        load_config(f)
    msg = str(err.value)
    assert "drifts_dirs: folder" in msg and "nope" in msg
    assert "g_image: file" in msg and "g.fits" in msg
    assert "\n" not in msg


def test_relative_paths_resolved_against_config_folder(tmp_path):
    (tmp_path / "night_1").mkdir()
    (tmp_path / "cat.csv").write_text("star_id,ra,dec\n")
    f = tmp_path / "run.yaml"
    f.write_text(yaml.safe_dump({"drifts_dirs": ["night_1"], "catalogue": "cat.csv", "output_dir": "out"}))
    cfg = load_config(f)
    assert cfg.drifts_dirs[0] == tmp_path / "night_1"
    assert cfg.output_dir == tmp_path / "out"


def test_not_yaml(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("drifts_dirs: [a\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(f)
