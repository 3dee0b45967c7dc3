"""Synthetic shapes data for the vlmd demo model (issue 4).

Shared by tools/train_demo.py (training + transformers evaluation), tools/eval_demo_server.py (accuracy
through the real server) and tests/integration/test_demo_model.py. Everything is a pure function of a seed,
so a data set is reproduced exactly from (seed, index).

Task: a plain light background, 1-3 filled, non-overlapping shapes (circle / square / triangle), each one
colour of COLORS; questions about the shape, a shape's colour, or the number of shapes; answers are one
lowercase word.
"""
import random

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
# Saturated, well separated colours so that a tiny vision tower can tell them apart after resizing.
COLORS = {
    "red": (220, 20, 20),
    "green": (20, 150, 40),
    "blue": (25, 60, 225),
    "yellow": (240, 205, 0),
    "purple": (130, 40, 170),
    "orange": (245, 130, 10),
    "black": (0, 0, 0),
}
KINDS = ("shape", "color", "count")
MIN_SIDE, MAX_SIDE = 64, 512
MIN_SHAPE = 16          # issue 4: shapes are at least 16 px across
GAP = 3                 # px of background kept between shapes' bounding boxes (non-overlapping)

# Seeds: training draws from TRAIN_SEED, the held-out transformers evaluation from EVAL_SEED, the server
# evaluation (tools/eval_demo_server.py) from SERVER_EVAL_SEED. None of these streams is shared.
TRAIN_SEED = 1
EVAL_SEED = 777001
SERVER_EVAL_SEED = 424242


def _background(rng):
    if rng.random() < 0.4:
        return (255, 255, 255)
    return tuple(rng.randint(215, 255) for _ in range(3))


def _place(rng, w, h, sizes):
    """Rejection-sample top-left corners so that the bounding boxes (plus GAP) do not intersect."""
    boxes = []
    for s in sizes:
        for _ in range(200):
            x, y = rng.randint(0, w - s), rng.randint(0, h - s)
            if all(x + s + GAP <= bx or bx + bs + GAP <= x or y + s + GAP <= by or by + bs + GAP <= y
                   for bx, by, bs in boxes):
                boxes.append((x, y, s))
                break
        else:
            return None
    return boxes


def draw_shape(d, shape, x, y, s, fill):
    """Draws one filled shape with its s x s bounding box at (x, y) (also used for the training-only
    label masks in tools/train_demo.py, so labels cover exactly the drawn pixels)."""
    if shape == "circle":
        d.ellipse([x, y, x + s - 1, y + s - 1], fill=fill)
    elif shape == "square":
        d.rectangle([x, y, x + s - 1, y + s - 1], fill=fill)
    else:
        d.polygon([(x + (s - 1) / 2, y), (x, y + s - 1), (x + s - 1, y + s - 1)], fill=fill)


def make_image(rng, n_shapes=None, force_shapes=None):
    """Returns (PIL RGB image, list of (shape, color)). force_shapes: optional list of shape names."""
    while True:
        w, h = rng.randint(MIN_SIDE, MAX_SIDE), rng.randint(MIN_SIDE, MAX_SIDE)
        n = n_shapes if n_shapes is not None else rng.randint(1, 3)
        m = min(w, h)
        # Sizes scale with the image so that shapes survive the resize to max_pixels; never below 16 px.
        lo = max(MIN_SHAPE, m // 6)
        hi = max(lo, m // 3) if n > 1 else max(lo, m // 2)
        sizes = [rng.randint(lo, hi) for _ in range(n)]
        boxes = _place(rng, w, h, sizes)
        if boxes is not None:
            break
    img = Image.new("RGB", (w, h), _background(rng))
    d = ImageDraw.Draw(img)
    objs = []
    for i, (x, y, s) in enumerate(boxes):
        shape = force_shapes[i] if force_shapes else rng.choice(SHAPES)
        color = rng.choice(list(COLORS))
        c = COLORS[color]
        draw_shape(d, shape, x, y, s, c)
        objs.append((shape, color))
    # Geometry for training-only dense labels (tools/train_demo.py); not drawn from rng, so the
    # sample streams are unchanged.
    img.info["vlmd_objects"] = [(sh, co, x, y, s) for (sh, co), (x, y, s) in zip(objs, boxes)]
    return img, objs


def vary(rng, q):
    """Issue 4: the same question in a different case and with trailing spaces must be accepted too."""
    r = rng.random()
    if r < 0.55:
        pass
    elif r < 0.7:
        q = q.lower()
    elif r < 0.85:
        q = q.upper()
    else:
        q = q.title()
    if rng.random() < 0.3:
        q = q + " " * rng.randint(1, 3)
    return q


def make_sample(rng, kind, canonical=False):
    """One (image, question, answer, kind, text_first) sample of the given question kind."""
    if kind == "shape":
        img, objs = make_image(rng, n_shapes=1)
        q, a = "What shape is this?", objs[0][0]
    elif kind == "color":
        while True:
            img, objs = make_image(rng)
            names = [s for s, _ in objs]
            uniq = [s for s in SHAPES if names.count(s) == 1]
            if uniq:
                break
        s = rng.choice(uniq)
        q, a = "What color is the %s?" % s, dict(objs)[s]
    elif kind == "count":
        img, objs = make_image(rng)
        q, a = "How many shapes are there?", str(len(objs))
    else:
        raise ValueError(kind)
    if not canonical:
        q = vary(rng, q)
    text_first = rng.random() < 0.3
    return img, q, a, kind, text_first


def sample_stream(seed, kind, n, canonical=False):
    """n samples of one kind; deterministic in (seed, kind)."""
    rng = random.Random("%d/%s" % (seed, kind))
    return [make_sample(rng, kind, canonical) for _ in range(n)]


def messages(q, text_first, image_part):
    """OpenAI/HF-style user message with one image part and one text part in the given order."""
    parts = [{"type": "text", "text": q}, image_part] if text_first else [image_part, {"type": "text", "text": q}]
    return [{"role": "user", "content": parts}]


# ---- sample images committed under tests/data/demo/ (README's curl example, the integration test) ----
SAMPLES_SEED = 5150     # not TRAIN_SEED / EVAL_SEED / SERVER_EVAL_SEED
SAMPLES = [  # (file name, n_shapes, forced shapes, question)
    ("red_circle.png", 1, None, "What shape is this?"),
    ("one_square.png", 1, ["square"], "What shape is this?"),
    ("one_triangle.png", 1, ["triangle"], "What shape is this?"),
    ("two_shapes.png", 2, ["circle", "triangle"], "What color is the triangle?"),
    ("three_shapes.png", 3, ["square", "circle", "triangle"], "How many shapes are there?"),
]


def answer_for(objs, q):
    """The expected answer to a canonical question about an image with these (shape, color) objects."""
    if q.startswith("What shape"):
        return objs[0][0]
    if q.startswith("How many"):
        return str(len(objs))
    return dict(objs)[q.rstrip("?").split()[-1]]


def write_samples(outdir):
    """Writes the sample PNGs and answers.json ([{file, question, answer}, ...]) to outdir."""
    import json
    import os
    os.makedirs(outdir, exist_ok=True)
    rng = random.Random("%d/samples" % SAMPLES_SEED)
    manifest = []
    for name, n, forced, q in SAMPLES:
        while True:  # redraw until the picture is small (tiny files) and, for red_circle.png, a red circle
            img, objs = make_image(rng, n_shapes=n, force_shapes=forced)
            if name == "red_circle.png" and objs[0] != ("circle", "red"):
                continue
            if max(img.size) <= 320:
                break
        img.save(os.path.join(outdir, name), optimize=True)
        manifest.append({"file": name, "question": q, "answer": answer_for(objs, q), "shapes": objs})
    with open(os.path.join(outdir, "answers.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


if __name__ == "__main__":
    import sys
    print(write_samples(sys.argv[1] if len(sys.argv) > 1 else "tests/data/demo"))
