"""bsldm_fast: fast, faithful BS-LDM bone suppression for chest X-rays (Sun et al., IEEE JBHI 2025)."""

__version__ = "0.1.0"
"""Set before the imports below: modules they load (engines.onnx_export) record it."""

from .config import PAPER, PRESETS, SMALL, TINY, ModelConfig, preset  # noqa: E402
from .suppressor import Suppressor  # noqa: E402

__all__ = ["PAPER", "PRESETS", "SMALL", "TINY", "ModelConfig", "Suppressor", "preset", "__version__"]
