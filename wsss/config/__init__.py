"""Typed run configuration: dataclasses per group (``schema``), loaded from YAML and dotted
``key=value`` overrides (``loading``), each value coerced to its key's type (``coercion``) and the
whole config checked before any work starts (``checks``)."""

from wsss.config.checks import check_config, check_ranges
from wsss.config.coercion import closest
from wsss.config.fields import ConfigError, Range
from wsss.config.loading import (
    RENAMED,
    config_from_dict,
    describe_keys,
    load_config,
    parse_override,
)
from wsss.config.schema import (
    CAM_METHODS,
    INTENSITY_MODES,
    MAP_NORMALIZATIONS,
    SYNTHETIC_IMAGE_SIZE,
    AffinityConfig,
    CamConfig,
    ClassifierConfig,
    Config,
    DataConfig,
    LoggerConfig,
    PseudoConfig,
    RunConfig,
    SegmenterConfig,
    TrainerConfig,
)
from wsss.config.training import SEGMENTER_ARCHITECTURES

__all__ = [
    "AffinityConfig",
    "CAM_METHODS",
    "CamConfig",
    "ClassifierConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "INTENSITY_MODES",
    "LoggerConfig",
    "MAP_NORMALIZATIONS",
    "PseudoConfig",
    "RENAMED",
    "Range",
    "RunConfig",
    "SEGMENTER_ARCHITECTURES",
    "SYNTHETIC_IMAGE_SIZE",
    "SegmenterConfig",
    "TrainerConfig",
    "check_config",
    "check_ranges",
    "closest",
    "config_from_dict",
    "describe_keys",
    "load_config",
    "parse_override",
]
