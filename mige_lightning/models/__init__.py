"""Pure ``nn.Module`` networks: no Lightning, no data files, no logging."""

from mige_lightning.models.mige import MIGE, build_mige
from mige_lightning.models.presets import PRESETS, MIGEConfig, get_config

__all__ = ["MIGE", "MIGEConfig", "PRESETS", "build_mige", "get_config"]
