#!/usr/bin/env python3
"""make_vision_fixtures.py — reference data for the vision layer's decode and resize tests.

Writes tests/fixtures/vision/ (seeded, deterministic; re-running rewrites identical files):
  resize/*.png + resize.json   Pillow Image.resize((w, h), BICUBIC) on uint8 RGB sources (random
                               noise, smooth gradients, 1-pixel-wide strips) for many (src, dst)
                               pairs: identity, up, down, odd ratios, one axis only, 1-pixel outputs.
  decode/*  + decode.json      encoded files (PNG gray/LA/palette/palette+tRNS/gray+tRNS/RGBA, GIF
                               with 2 frames, BMP, WebP lossless/lossy/alpha) and, per file, the
                               RGB array transformers' convert_to_rgb makes of Pillow's decode
                               (stored as a PNG), so the C decoder is checked against the reference.
Usage: python3 tools/make_vision_fixtures.py [--out tests/fixtures/vision]
Needs Pillow (with WebP support), numpy, transformers (for convert_to_rgb)."""
import argparse
import hashlib
import io
import json
import os

import numpy as np
import PIL
from PIL import Image


def smooth(w, h, rng):
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.zeros((h, w, 3))
    for c in range(3):
        a, b, ph = rng.random(3)
        img[..., c] = 127.5 + 127.5 * np.sin(2 * np.pi * (a * x / max(w, 1) + b * y / max(h, 1)) + 6 * ph)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def noise(w, h, rng):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def sha(a):
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures/vision")
    args = ap.parse_args()
    rng = np.random.default_rng(20261125)
    os.makedirs(os.path.join(args.out, "resize"), exist_ok=True)
    os.makedirs(os.path.join(args.out, "decode"), exist_ok=True)

    # ---- resize -------------------------------------------------------------------------
    sources = {
        "noise_37x23": noise(37, 23, rng),
        "smooth_64x48": smooth(64, 48, rng),
        "noise_1x50": noise(1, 50, rng),
        "noise_50x1": noise(50, 1, rng),
        "noise_301x203": noise(301, 203, rng),
        "smooth_500x333": smooth(500, 333, rng),
    }
    targets = {
        "noise_37x23": [(37, 23), (74, 46), (100, 7), (1, 1), (36, 23), (37, 22), (13, 29), (3, 200)],
        "smooth_64x48": [(28, 28), (56, 84), (640, 480), (63, 47), (65, 49), (1, 48), (64, 1)],
        "noise_1x50": [(1, 50), (5, 50), (3, 17), (28, 56)],
        "noise_50x1": [(50, 3), (17, 1), (56, 28)],
        "noise_301x203": [(280, 196), (308, 196), (28, 28), (301, 29), (97, 203), (602, 406)],
        "smooth_500x333": [(504, 336), (112, 84), (57, 1000), (250, 167)],
    }
    cases = []
    for name, a in sources.items():
        src_file = f"resize/src_{name}.png"
        Image.fromarray(a, "RGB").save(os.path.join(args.out, src_file), optimize=True)
        for (w, h) in targets[name]:
            r = np.asarray(Image.fromarray(a, "RGB").resize((w, h), Image.BICUBIC))
            f = f"resize/{name}_to_{w}x{h}.png"
            Image.fromarray(r, "RGB").save(os.path.join(args.out, f), optimize=True)
            cases.append({"source": src_file, "target_wh": [w, h], "file": f, "sha256_rgb": sha(r)})
    with open(os.path.join(args.out, "resize.json"), "w") as fh:
        json.dump({"reference": f"Pillow {PIL.__version__} Image.resize((w, h), Image.BICUBIC), uint8 RGB",
                   "cases": cases}, fh, indent=1)

    # ---- decode / RGB conversion --------------------------------------------------------
    from transformers.image_transforms import convert_to_rgb

    base = smooth(40, 30, rng)
    alpha = np.clip(np.rint(np.linspace(0, 255, 40))[None, :] + rng.integers(-30, 30, (30, 40)), 0, 255).astype(np.uint8)
    gray = base[..., 0]
    encoded = {}

    def png(img, **kw):
        b = io.BytesIO()
        img.save(b, "PNG", **kw)
        return b.getvalue()

    encoded["gray.png"] = png(Image.fromarray(gray, "L"))
    encoded["gray_trns.png"] = png(Image.fromarray(gray, "L"), transparency=int(gray[5, 5]))
    encoded["la.png"] = png(Image.fromarray(np.stack([gray, alpha], -1), "LA"))
    pal = Image.fromarray(base, "RGB").quantize(colors=37, dither=Image.Dither.NONE)
    encoded["palette.png"] = png(pal)
    encoded["palette_trns.png"] = png(pal, transparency=3)
    encoded["rgba.png"] = png(Image.fromarray(np.dstack([base, alpha]), "RGBA"))
    encoded["rgb.bmp"] = (lambda b: (Image.fromarray(base, "RGB").save(b, "BMP"), b.getvalue())[1])(io.BytesIO())
    # GIF: two frames; the first one is what vlmd (and Pillow's Image.open) uses.
    f0 = Image.fromarray(base, "RGB").quantize(colors=64, dither=Image.Dither.NONE)
    f1 = Image.fromarray(255 - base, "RGB").quantize(colors=64, dither=Image.Dither.NONE)
    b = io.BytesIO()
    f0.save(b, "GIF", save_all=True, append_images=[f1], duration=100, loop=0)
    encoded["two_frames.gif"] = b.getvalue()
    for nm, img, kw in [("lossless.webp", Image.fromarray(base, "RGB"), {"lossless": True}),
                        ("lossy.webp", Image.fromarray(base, "RGB"), {"quality": 80}),
                        ("alpha_lossless.webp", Image.fromarray(np.dstack([base, alpha]), "RGBA"), {"lossless": True})]:
        b = io.BytesIO()
        img.save(b, "WEBP", **kw)
        encoded[nm] = b.getvalue()

    dcases = []
    for nm, data in encoded.items():
        with open(os.path.join(args.out, "decode", nm), "wb") as fh:
            fh.write(data)
        im = Image.open(io.BytesIO(data))
        mode = im.mode
        rgb = np.asarray(convert_to_rgb(im, return_numpy=True))
        ef = f"decode/{nm}.rgb.png"
        Image.fromarray(rgb, "RGB").save(os.path.join(args.out, ef))
        dcases.append({"file": f"decode/{nm}", "pil_mode": mode, "expected_rgb": ef,
                       "size_wh": [im.width, im.height], "sha256_rgb": sha(rgb)})
    with open(os.path.join(args.out, "decode.json"), "w") as fh:
        json.dump({"reference": f"Pillow {PIL.__version__} Image.open + transformers convert_to_rgb "
                                "(alpha composited onto white)", "cases": dcases}, fh, indent=1)
    print(f"wrote {len(cases)} resize cases and {len(dcases)} decode cases to {args.out}")


if __name__ == "__main__":
    main()
