#!/usr/bin/env python3
"""make_nvlm.py — reference fixtures for vlmd's NVLM-D support (tests/fixtures/nvlm/).

Writes:
  tiling.json   [w, h, max_num, cols, rows] for many image sizes and max_num 1..12: the grid that the
                NVLM-D model card's dynamic_preprocess picks (find_closest_aspect_ratio, candidate order
                from sorted(set(...)) — CPython's set order decides ties between equal i*j — and the
                "area > half the grid" tie-break), re-stated below from the source's semantics.
  pixels.json   per synthetic image: grid, tile count and, per tile, an FNV-1a hash of the f32
                pixel_values bytes plus their f64 sum, from PIL (Image.resize default filter = BICUBIC,
                crop, thumbnail) and torch (ToTensor /255, Normalize with ImageNet mean/std) exactly as
                build_transform + dynamic_preprocess do. torchvision is not installed here: ToTensor and
                Normalize are the same f32 element ops written with torch (T.Resize((448,448)) on a
                448x448 PIL image is PIL's copy-without-filtering, so it is left out).
  kOrder        (printed with --print-order) the candidate order table in vision/nvlm_preprocess.c.

The synthetic image is a formula both this script and tests/unit/test_nvlm.c compute:
  rgb[y][x][c] = (7x + 13y + 50c + 3((x*y) mod 31)) mod 256
Usage: nice -n 15 python3 tools/make_nvlm.py --out tests/fixtures/nvlm
"""
import argparse
import json
import os
import random
import sys

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TILE = 448


def candidate_grids(min_num, max_num):
    # same construction as the source: a set of (i, j), then a stable sort on i*j
    grids = set((i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1)
                for j in range(1, n + 1) if min_num <= i * j <= max_num)
    return sorted(grids, key=lambda g: g[0] * g[1])


def pick_grid(w, h, max_num, min_num=1, size=TILE):
    aspect = w / h
    best_diff, best = float("inf"), (1, 1)
    for i, j in candidate_grids(min_num, max_num):
        diff = abs(aspect - i / j)
        if diff < best_diff:
            best_diff, best = diff, (i, j)
        elif diff == best_diff and w * h > 0.5 * size * size * i * j:
            best = (i, j)
    return best


def synth_image(w, h):
    from PIL import Image
    y, x = np.mgrid[0:h, 0:w].astype(np.int64)
    planes = [(7 * x + 13 * y + 50 * c + 3 * ((x * y) % 31)) % 256 for c in range(3)]
    return Image.fromarray(np.stack(planes, axis=-1).astype(np.uint8), "RGB")


def tiles_of(img, max_num, use_thumbnail=True, size=TILE):
    cols, rows = pick_grid(img.width, img.height, max_num, size=size)
    big = img.resize((cols * size, rows * size))  # the source's call: default filter
    out = []
    for k in range(cols * rows):
        x0, y0 = (k % cols) * size, (k // cols) * size
        out.append(big.crop((x0, y0, x0 + size, y0 + size)))
    if use_thumbnail and len(out) != 1:
        out.append(img.resize((size, size)))
    return (cols, rows), out


def to_pixel_values(tile):
    import torch
    t = torch.from_numpy(np.asarray(tile, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()
    t = t.to(torch.float32).div(255)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32)[:, None, None]
    return t.sub_(mean).div_(std).numpy()


def fnv1a32(b):
    h = 0x811C9DC5
    arr = np.frombuffer(b, dtype=np.uint8)
    for v in arr.tolist():
        h = ((h ^ v) * 0x01000193) & 0xFFFFFFFF
    return h


def tiling_cases():
    rnd = random.Random(5)
    sizes = set()
    # exact ties on aspect difference (midpoints between candidate ratios) and exact candidate ratios,
    # each at a small and a large area so both sides of the area tie-break occur
    for num, den in [(5, 4), (4, 5), (3, 2), (2, 3), (5, 2), (2, 5), (1, 1), (7, 2), (2, 7), (9, 2), (5, 3),
                     (3, 5), (4, 3), (3, 4), (11, 2), (2, 11), (7, 4), (4, 7), (13, 4), (6, 1), (1, 6)]:
        for scale in (1, 40, 100, 300, 700):
            sizes.add((num * scale, den * scale))
    for _ in range(300):
        sizes.add((rnd.randint(1, 4000), rnd.randint(1, 4000)))
    for _ in range(100):
        w = rnd.randint(1, 300)
        sizes.add((w, rnd.randint(1, 300)))
    return sorted(sizes)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="tests/fixtures/nvlm")
    ap.add_argument("--print-order", action="store_true")
    args = ap.parse_args()
    if args.print_order:
        digits = "0123456789abc"
        for m in range(1, 13):
            print('    "' + "".join(digits[i] + digits[j] for i, j in candidate_grids(1, m)) + '",')
        return
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for (w, h) in tiling_cases():
        for m in range(1, 13):
            c, r = pick_grid(w, h, m)
            rows.append([w, h, m, c, r])
    with open(os.path.join(args.out, "tiling.json"), "w") as f:
        json.dump({"made_by": "tools/make_nvlm.py", "python": sys.version.split()[0], "cases": rows}, f,
                  separators=(",", ":"))
    # pixel cases: 1 tile (no thumbnail), then 2..6 grid tiles + thumbnail, under max_num 6
    pix_sizes = [(300, 200), (448, 448), (900, 448), (1300, 448), (1000, 1000), (120, 600), (1344, 896),
                 (700, 333), (333, 700), (2000, 250), (50, 40)]
    cases = []
    for (w, h) in pix_sizes:
        img = synth_image(w, h)
        (c, r), tiles = tiles_of(img, 6)
        entry = {"w": w, "h": h, "max_num": 6, "grid": [c, r], "n_tiles": len(tiles), "tiles": []}
        for t in tiles:
            pv = np.ascontiguousarray(to_pixel_values(t), dtype="<f4")
            entry["tiles"].append({"fnv1a": fnv1a32(pv.tobytes()), "sum": float(pv.astype(np.float64).sum())})
        cases.append(entry)
        print(f"{w}x{h}: grid {c}x{r}, {len(tiles)} tiles", file=sys.stderr)
    with open(os.path.join(args.out, "pixels.json"), "w") as f:
        json.dump({"made_by": "tools/make_nvlm.py", "pil_default_resize": "BICUBIC",
                   "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "cases": cases}, f, indent=1)


if __name__ == "__main__":
    main()
