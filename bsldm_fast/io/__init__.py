"""File input and output: images on disk <-> 2-D NumPy arrays."""

from .images import ImageError, Job, find_images, read_image, write_image

__all__ = ["ImageError", "Job", "find_images", "read_image", "write_image"]
