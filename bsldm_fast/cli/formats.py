"""`bsldm-fast formats`: which image formats and DICOM transfer syntaxes this installation reads."""

from __future__ import annotations

import argparse

from ..io import MAX_PIXELS, MAX_SIDE, MIN_SIDE, support_table


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "formats",
        help="list the supported image formats and DICOM transfer syntaxes",
        description="List the image formats, size limits and DICOM transfer syntaxes that this "
        "installation can read, and for each missing DICOM decoder the package to install.",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    print("PNG   8/16-bit grey (colour, palette and alpha converted to 8-bit grey with a warning)")
    print("JPEG  8-bit grey (colour converted with a warning); results are written at quality 95")
    print("TIFF  8/16-bit integer, int16, float (NaN/inf refused); one page; zlib/LZMA kept")
    print("DICOM single-frame MONOCHROME1/2, 8/16 bits allocated; transfer syntaxes:")
    for line in support_table().splitlines():
        print("  " + line)
    print(f"Sizes: {MIN_SIDE} to {MAX_SIDE} px a side, at most {MAX_PIXELS / 1e6:.1f} Mpx.")
    return 0
