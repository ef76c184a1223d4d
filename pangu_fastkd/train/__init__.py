"""``python -m pangu_fastkd.train``: curriculum SFT and offline KD stages, resumable, on one or
many processes (torchrun)."""

from .config import ConfigError, PipelineConfig, config_from_dict, load_config
from .pipeline import Pipeline, RunDirError

__all__ = [
    "ConfigError",
    "Pipeline",
    "PipelineConfig",
    "RunDirError",
    "config_from_dict",
    "load_config",
]
