"""Graceful loading of the compiled extension `bsldm_fast._C`.

The package works without it (every op has a PyTorch reference), but the README's install always
builds it; `C` is None only in a source checkout that was never built, and `load_error` says why.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

try:
    import torch  # noqa: F401  (loads libtorch before the extension that links against it)

    from . import _C as C

    load_error: str | None = None
except ImportError as error:  # pragma: no cover - depends on how the package was installed
    C = None
    load_error = str(error)
    logger.debug("bsldm_fast._C not available: %s", error)


def has_cuda_ops() -> bool:
    """Whether `_C` was compiled with its CUDA sources."""
    return C is not None and bool(C.with_cuda())
