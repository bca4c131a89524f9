"""bsldm_fast: fast, faithful BS-LDM bone suppression for chest X-rays (Sun et al., IEEE JBHI 2025)."""

from .config import PAPER, PRESETS, SMALL, TINY, ModelConfig, preset
from .suppressor import Suppressor

__version__ = "0.1.0"

__all__ = ["PAPER", "PRESETS", "SMALL", "TINY", "ModelConfig", "Suppressor", "preset", "__version__"]
