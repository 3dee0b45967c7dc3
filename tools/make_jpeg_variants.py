#!/usr/bin/env python3
"""make_jpeg_variants.py — JPEG files in the layouts vlmd's libjpeg-turbo path must decode exactly as
Pillow does, each with Pillow's decode (Image.open(f).convert("RGB")) beside it as <name>.rgb.png:

  gray_48x36.jpg         single-component (grayscale) baseline
  cmyk_adobe_48x36.jpg   4-component CMYK with the Adobe APP14 marker (stored inverted)
  progressive_52x38.jpg  progressive, 4:4:4, odd sizes
  restart_420_61x45.jpg  baseline 4:2:0 with restart markers every row of MCUs, odd sizes

tests/unit/test_vision.c (test_decode_jpeg_variants) compares vlmd's decode with the PNGs.
Existing files are kept: the committed bytes are the reference.

    python3 tools/make_jpeg_variants.py            # numpy + Pillow only
"""
import os

import numpy as np
from PIL import Image

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "images", "jpeg")


def picture(w, h, seed):
    rng = np.random.Generator(np.random.PCG64(seed))
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.stack([255 * (0.5 + 0.4 * np.sin((x * (c + 1) + y * (3 - c)) / 7.0 + c)) for c in range(3)], -1)
    img += rng.standard_normal((h, w, 3)) * 10
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")


def main():
    os.makedirs(OUT, exist_ok=True)
    variants = {
        "gray_48x36.jpg": lambda p: picture(48, 36, 1).convert("L").save(p, quality=85),
        "cmyk_adobe_48x36.jpg": lambda p: picture(48, 36, 2).convert("CMYK").save(p, quality=88),
        "progressive_52x38.jpg": lambda p: picture(52, 38, 3).save(p, quality=90, progressive=True, subsampling=0),
        "restart_420_61x45.jpg": lambda p: picture(61, 45, 4).save(p, quality=80, subsampling=2, restart_marker_rows=1),
    }
    for name, write in variants.items():
        p = os.path.join(OUT, name)
        if not os.path.exists(p):
            write(p)
        Image.open(p).convert("RGB").save(p + ".rgb.png", optimize=False)
        print(name, Image.open(p).mode, os.path.getsize(p), "bytes")


if __name__ == "__main__":
    main()
