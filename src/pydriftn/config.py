"""The one configuration model of pydriftn.

Every knob of every stage is declared once here, as a typed pydantic model with
its default and a description. The YAML file of ``pydriftn run``, the example
printed by ``pydriftn config --example`` and the defaults used by the library
all come from these declarations.

Keys known to users of pydriftn 0.1.4's ``demo_values.yaml`` keep their names
and meaning: ``drifts_dirs``, ``output_dir``, ``read_mask``, ``img_keyword``,
``mask_keyword``, ``read_targets``, ``targets`` and ``pdf_output``.

Validation errors become a :class:`~pydriftn.errors.ConfigError` with one line
per problem naming the key, the value and what was expected; unknown keys are
errors with a "did you mean" hint.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ConfigError
from .geometry import DEFAULT_DRIFT_RATE_ARCSEC_S, parse_drift_rate

__all__ = [
    "CatalogueConfig",
    "AstrometryConfig",
    "SkyConfig",
    "ExtractConfig",
    "DetrendConfig",
    "ClassifyConfig",
    "SearchConfig",
    "PipelineConfig",
    "load_config",
    "config_from_dict",
    "example_yaml",
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class CatalogueConfig(_Section):
    """Reference catalogue from the pointed g and r images."""

    num_target: int = Field(20, ge=1, description="reference stars wanted per CCD")
    edge_crit: float = Field(0.05, ge=0, lt=0.5, description="edge margin as a fraction of the CCD size")
    iso_perc: float = Field(0.99, gt=0, le=1, description="isolation percentile for reference stars")
    flux_perc: float = Field(0.8, gt=0, le=1, description="flux percentile for reference stars")
    morph_perc: float = Field(0.8, gt=0, le=1, description="roundness percentile for reference stars")
    detect_sigma: float = Field(5.0, gt=0, description="detection threshold in units of the local noise")
    anchor_min_matches: int = Field(3, ge=1, description="fewest Gaia matches for a CCD/band anchor to be used")
    anchor_max_rms_arcsec: float | None = Field(
        None, gt=0, description="largest residual rms of an accepted Gaia anchor; null = half the match radius"
    )
    gaia_edge_margin_arcsec: float = Field(
        30.0, ge=0, description="Gaia stars this far outside a pointed CCD join its catalogue (their trails "
        "drift onto the CCD); 0 = none"
    )


class AstrometryConfig(_Section):
    """Trail detection, matching to the catalogue and WCS re-fit."""

    anchor: Literal["start", "middle", "end"] = Field(
        "middle", description="trail point reported as x, y in the trail table"
    )
    detect_sigma: float = Field(5.0, gt=0, description="matched-filter detection threshold (sigma)")
    max_pointing_error_arcsec: float = Field(60.0, gt=0, description="largest pointing error searched")
    max_rotation_deg: float = Field(0.2, ge=0, description="largest field rotation searched")
    sip_order: int | None = Field(None, ge=0, le=5, description="SIP order; null chooses by residuals")
    mask_bits: list[str] | None = Field(
        None, description="dq-mask flags treated as bad pixels (names of pydriftn.flags.PixelFlag); "
        "null = all but TRANSIENT, EDGE, INTERPOLATED"
    )
    detect_cosmics_without_mask: bool = Field(
        True, description="find cosmic rays with astroscrappy when no dq mask is read"
    )


class SkyConfig(_Section):
    """Local sky in a stadium-shaped annulus around each trail."""

    radius: float = Field(12.0, gt=0, description="inner radius of the stadium annulus (px); "
                          "0.1.4 used 7, which takes in the star's own PSF wings (-2 % flux bias)")
    pad: float = Field(5.0, gt=0, description="annulus width (px)")
    length: float | None = Field(None, gt=0, description="stadium length (px); null = trail length")
    verbose_save: int = Field(0, ge=0, le=2, description="0: none, 1: save annulus mask, 2: mask and data")


class ExtractConfig(_Section):
    """Per-sample extraction along each trail."""

    method: Literal["optimal", "box", "l3"] = Field("optimal", description="extraction method")
    half_width_fwhm: float = Field(2.0, gt=0, description="cross-track half-width in units of FWHM")
    deblend: bool = Field(True, description="model overlapping trails of neighbours jointly")
    profile_sys: float = Field(0.0015, ge=0, description="fractional profile-model error added to each "
                               "sample's variance (bright stars; calibrated on the simulator)")
    full_trail: bool = Field(False, description="write the shutter-ramp samples too")


class DetrendConfig(_Section):
    """Removal of the common tracking/atmosphere pattern."""

    method: Literal["ensemble", "best_star"] = Field("ensemble", description="normalisation method")
    max_reference_stars: int = Field(150, ge=1, description="reference stars used per CCD")
    ref_snr_min: float = Field(20.0, gt=0, description="minimum median per-sample S/N of a reference star")
    clip_sigma: float = Field(4.0, gt=0, description="outlier clipping threshold")


class ClassifyConfig(_Section):
    """Classification of sources on the drift image."""

    enabled: bool = Field(True, description="run the classification stage")
    flash_sigma: float = Field(7.0, gt=0, description="point-source detection threshold (sigma); "
                               "5.5 gives ~2 false flashes per CCD, 7 still finds all S/N>=10 flashes")
    save_cutouts: bool = Field(True, description="write PNG cutouts of non-star detections")


class SearchConfig(_Section):
    """Event search over the light-curve store."""

    enabled: bool = Field(False, description="run the event search at the end of `pydriftn run` (into OUTPUT/search)")
    false_alarm_per_star_night: float = Field(3e-5, gt=0, lt=1,
                                              description="target false-alarm probability per star-night")
    n_scrambles: int = Field(20, ge=1, description="time-scrambled copies used to calibrate the threshold")
    report_pages: int = Field(50, ge=0, description="candidate pages in the report (PDF/HTML)")
    efficiency_dir: Path | None = Field(None, description="`pydriftn efficiency` output shown in the report")


class PipelineConfig(_Section):
    """Configuration of ``pydriftn run``."""

    drifts_dirs: list[Path] = Field(..., min_length=1, description="night folders with drift exposures")
    output_dir: Path = Field(Path("pydriftn_output"), description="where outputs are written")
    read_mask: bool = Field(True, description="read the dq mask beside each image")
    img_keyword: str = Field("image", min_length=1, description="file-name keyword of images")
    mask_keyword: str = Field("dqmask", min_length=1, description="file-name keyword of dq masks")
    read_targets: bool = Field(False, description="extract only the stars of the target list")
    targets: Path | None = Field(None, description="CSV of targets with name, ra, dec")
    target_radius_arcsec: float = Field(1.0, gt=0, description="match radius for targets")
    pdf_output: str = Field("extractions", min_length=1, description="base name of the PDF plots")
    ccds: list[str] | None = Field(None, description="CCD extension names; null = all")
    workers: int | None = Field(None, ge=1, description="parallel workers; null = all cores")
    executor: Literal["local", "dask"] = Field("local", description="where units run")
    scheduler: str | None = Field(None, description="dask scheduler address; null = LocalCluster")
    g_image: Path | None = Field(None, description="pointed g image (to build the catalogue)")
    r_image: Path | None = Field(None, description="pointed r image (to build the catalogue)")
    catalogue: Path | None = Field(None, description="existing master catalogue (CSV or Parquet)")
    gaia: str | None = Field(None, description="Gaia reference file, 'tap', or null")
    drift_rate_arcsec_s: tuple[float, float] = Field(
        DEFAULT_DRIFT_RATE_ARCSEC_S, description="drift-rate vector (east, north) in arcsec/s"
    )
    image_glob: str = Field("*.fits*", description="pattern of drift image files in a night folder")
    catalogue_options: CatalogueConfig = Field(default_factory=CatalogueConfig)
    astrometry: AstrometryConfig = Field(default_factory=AstrometryConfig)
    sky: SkyConfig = Field(default_factory=SkyConfig)
    extract: ExtractConfig = Field(default_factory=ExtractConfig)
    detrend: DetrendConfig = Field(default_factory=DetrendConfig)
    classify: ClassifyConfig = Field(default_factory=ClassifyConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)

    @field_validator("drift_rate_arcsec_s", mode="before")
    @classmethod
    def _drift_rate(cls, value):
        try:
            return parse_drift_rate(value)
        except ValueError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("ccds", mode="before")
    @classmethod
    def _ccds(cls, value):
        if isinstance(value, str):
            return [c.strip() for c in value.split(",") if c.strip()]
        return value

    def resolve_paths(self, base: Path) -> PipelineConfig:
        """Return a copy with relative paths taken relative to ``base``."""

        def fix(p):
            if p is None:
                return None
            p = Path(os.path.expanduser(str(p)))
            return p if p.is_absolute() else (base / p)

        update = {
            "drifts_dirs": [fix(p) for p in self.drifts_dirs],
            "output_dir": fix(self.output_dir),
            "targets": fix(self.targets),
            "g_image": fix(self.g_image),
            "r_image": fix(self.r_image),
            "catalogue": fix(self.catalogue),
        }
        if self.gaia not in (None, "tap"):
            update["gaia"] = str(fix(self.gaia))
        return self.model_copy(update=update)

    def check_inputs(self) -> None:
        """Check that the folders and files named exist; raise ConfigError otherwise."""
        problems = []
        for p in self.drifts_dirs:
            if not Path(p).is_dir():
                problems.append(f"drifts_dirs: folder {str(p)!r} does not exist")
        for key in ("targets", "g_image", "r_image", "catalogue"):
            p = getattr(self, key)
            if p is not None and not Path(p).exists():
                problems.append(f"{key}: file {str(p)!r} does not exist")
        if self.read_targets and self.targets is None:
            problems.append("read_targets is true but no 'targets' file is given")
        if self.catalogue is None and (self.g_image is None or self.r_image is None):
            problems.append(
                "no catalogue: give 'catalogue' (an existing master catalogue) "
                "or both 'g_image' and 'r_image'"
            )
        if self.gaia not in (None, "tap") and not Path(self.gaia).exists():
            problems.append(f"gaia: file {self.gaia!r} does not exist (or use 'tap')")
        if problems:
            raise ConfigError("; ".join(problems))


_ALIASES = {"photometry_catalogue": "catalogue", "pdf_output_path": "pdf_output", "num_workers": "workers"}


def _known_keys(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def _section_model(path: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = PipelineConfig
    for key in path:
        field = model.model_fields.get(key)
        if field is None:
            return None
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            return None
    return model


def _format_error(err: dict) -> str:
    loc = tuple(err.get("loc", ()))
    key = ".".join(str(p) for p in loc) or "(top level)"
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        model = _section_model(loc[:-1]) or PipelineConfig
        close = difflib.get_close_matches(str(loc[-1]), _known_keys(model), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown key {key!r}{hint}"
    if kind == "missing":
        return f"missing required key {key!r}"
    value = err.get("input")
    msg = err.get("msg", "invalid")
    return f"{key}: {msg} (got {value!r})"


def config_from_dict(data: dict[str, Any], *, source: str = "configuration") -> PipelineConfig:
    """Validate a configuration mapping; raise :class:`ConfigError` naming each problem."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys to values, got {type(data).__name__}")
    data = {_ALIASES.get(k, k): v for k, v in data.items()}
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        lines = [_format_error(e) for e in exc.errors()]
        raise ConfigError(f"{source}: " + "; ".join(lines)) from None


def load_config(path, *, check_inputs: bool = True) -> PipelineConfig:
    """Read and validate a YAML configuration file.

    Relative paths in the file are taken relative to the file's folder.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"configuration file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    cfg = config_from_dict(data or {}, source=str(path)).resolve_paths(path.resolve().parent)
    if check_inputs:
        try:
            cfg.check_inputs()
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    return cfg


def _yaml_lines(model: type[BaseModel], indent: int = 0) -> list[str]:
    pad = "  " * indent
    lines = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            doc = (ann.__doc__ or "").strip().splitlines()[0]
            lines.append(f"{pad}# {doc}")
            lines.append(f"{pad}{name}:")
            lines.extend(_yaml_lines(ann, indent + 1))
            continue
        if field.is_required():
            default = ["night_1/"] if name == "drifts_dirs" else None
        else:
            default = field.get_default(call_default_factory=True)
        if isinstance(default, Path):
            default = str(default)
        if isinstance(default, tuple):
            default = list(default)
        text = yaml.safe_dump({name: default}, default_flow_style=True, width=200).strip()
        if text.startswith("{") and text.endswith("}"):
            text = text[1:-1]
        lines.append(f"{pad}{text}  # {field.description or ''}")
    return lines


def example_yaml() -> str:
    """A complete, commented example configuration with every default."""
    head = [
        "# pydriftn run configuration (every key with its default).",
        "# Relative paths are relative to this file's folder.",
        "# g_image/r_image build the reference catalogue; or give `catalogue:` instead.",
    ]
    body = _yaml_lines(PipelineConfig)
    return "\n".join(head + body) + "\n"
