"""File input and output: radiograph files (PNG, JPEG, TIFF, DICOM) <-> 2-D NumPy arrays, and
batch runs over folders."""

from .batch import BatchOptions, BatchResult, Outcome, run_batch, suppress_file
from .dicom import Provenance, support_table, transfer_syntaxes
from .formats import MAX_PIXELS, MAX_SIDE, MIN_SIDE, ImageError
from .images import Job, find_images, read_image, write_image
from .radiograph import Radiograph, read_radiograph, write_radiograph

__all__ = [
    "MAX_PIXELS", "MAX_SIDE", "MIN_SIDE", "BatchOptions", "BatchResult", "ImageError", "Job",
    "Outcome", "Provenance", "Radiograph", "find_images", "read_image", "read_radiograph",
    "run_batch", "support_table", "suppress_file", "transfer_syntaxes", "write_image",
    "write_radiograph",
]
