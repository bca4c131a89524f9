"""Which received instances the node processes. Everything else is acknowledged and left alone."""

from __future__ import annotations

from ..io.dicom import KIND_DESCRIPTIONS
from .config import FilterSettings

# The SOP classes the SCP accepts: CR, DX (for presentation and for processing), Secondary Capture.
STORAGE_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1": "CR Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.2": "Multi-frame Grayscale Byte Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.3": "Multi-frame Grayscale Word Secondary Capture Image Storage",
}

_OWN_MARKS = tuple(f"{text} by bsldm_fast" for text in KIND_DESCRIPTIONS.values())


def _shown(value: str) -> str:
    return repr(value) if value else "missing"


def is_own_output(ds) -> bool:
    """A derived instance this project wrote: Image Type DERIVED and its Derivation Description."""
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    description = str(ds.get("DerivationDescription", ""))
    return bool(image_type) and image_type[0] == "DERIVED" and description.startswith(_OWN_MARKS)


def skip_reason(ds, settings: FilterSettings) -> str | None:
    """Why `ds` is not processed, or None when it is. Reads the header only (no pixel decoding)."""
    if is_own_output(ds):
        return "a derived instance written by bsldm_fast (never re-processed)"
    modality = str(ds.get("Modality", "")).strip().upper()
    if settings.modalities and modality not in {m.upper() for m in settings.modalities}:
        return f"modality {_shown(modality)} is not one of {list(settings.modalities)}"
    if "PixelData" not in ds:
        return "no pixel data"
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        return f"invalid Number of Frames {ds.get('NumberOfFrames')!r}"
    if frames != 1:
        return f"multi-frame ({frames} frames)"
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1 or photometric not in ("MONOCHROME1",
                                                                          "MONOCHROME2"):
        return f"not grey-scale ({photometric or 'no photometric interpretation'})"
    if settings.body_parts:
        part = str(ds.get("BodyPartExamined", "")).strip().upper()
        if part not in {p.upper() for p in settings.body_parts}:
            return f"body part {_shown(part)} is not one of {list(settings.body_parts)}"
    if settings.view_positions:
        view = str(ds.get("ViewPosition", "")).strip().upper()
        if view not in {v.upper() for v in settings.view_positions}:
            return f"view position {_shown(view)} is not one of {list(settings.view_positions)}"
    return None
