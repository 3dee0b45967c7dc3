#!/usr/bin/env python3
"""make_fixtures.py — runs the Hugging Face reference (torch + transformers, CPU, eager attention) on the
make_model.py test checkpoints and writes the committed fixtures vlmd's tests compare against.

Developer tool, not run by CI (needs torch + transformers; CI has numpy only). Writes:
  tests/data/images/*                      deterministic synthetic test images (+ one RGBA PNG, one JPEG and
                                           its PIL-decoded RGB as PNG)
  tests/fixtures/qwen2vl/<model>/<case>/   case.json, logits0.npy, [pixel_values.npy, image_embeds.npy],
                                           [logits0_f32ref.npy for bf16 models]
  tests/fixtures/qwen2vl/smart_resize.json reference smart_resize outputs / errors
  tests/fixtures/qwen2vl/rope_index.json   reference get_rope_index results
  tests/fixtures/qwen2vl/summary.json      measured facts (min top-2 gaps, bf16-vs-f32 reference diffs)

Usage: python3 tools/make_fixtures.py [--models a,b] [--cases x,y] [--models-dir /tmp/dir]
The checkpoints are regenerated through make_model.write_model (same bytes as CI's copies).
Image preprocessing uses transformers' PIL image processor (Qwen2VLImageProcessorPil, the "slow" path that
vlmd implements, SPEC §E.6), never the torchvision one.
"""

import argparse
import hashlib
import json
import math
import os
import sys
import warnings

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import make_model  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration, Qwen2VLProcessor  # noqa: E402
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as pil_ip  # noqa: E402

torch.set_num_threads(1)  # the machine is shared
warnings.filterwarnings("ignore", category=FutureWarning)
transformers.logging.set_verbosity_error()

IMG_DIR = os.path.join(ROOT, "tests", "data", "images")
FIX_DIR = os.path.join(ROOT, "tests", "fixtures", "qwen2vl")
IMG_REL = "tests/data/images/"
N_GREEDY = 32
PV_INDEX = {}  # sha256 of pixel_values (f32 bytes) -> repository-relative .npy path already written


def index_pixel_values():
    for dirpath, _, files in os.walk(FIX_DIR):
        if "pixel_values.npy" in files:
            p = os.path.join(dirpath, "pixel_values.npy")
            a = np.ascontiguousarray(np.load(p).astype(np.float32))
            PV_INDEX[hashlib.sha256(a.tobytes()).hexdigest()] = os.path.relpath(p, ROOT)


def check_pixel_value_refs():
    for dirpath, _, files in os.walk(FIX_DIR):
        if "case.json" not in files:
            continue
        cj = json.load(open(os.path.join(dirpath, "case.json")))
        pv = cj.get("pixel_values")
        if pv:
            a = np.ascontiguousarray(np.load(os.path.join(ROOT, pv["file"])).astype(np.float32))
            if hashlib.sha256(a.tobytes()).hexdigest() != pv["sha256_f32"]:
                raise RuntimeError(f"{dirpath}: pixel_values file {pv['file']} is stale; regenerate all models")
IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END = 151655, 151656, 151652, 151653

# ----------------------------------------------------------------------------------------------------
# Test images: gradients + filled shapes + noise, so that resampling actually changes values.

IMAGES = {
    # name: (width, height, seed, mode)
    "grad_224.png": (224, 224, 11, "RGB"),
    "grad_112.png": (112, 112, 12, "RGB"),
    "odd_150x97.png": (150, 97, 13, "RGB"),
    "tiny_40x30.png": (40, 30, 14, "RGB"),
    "wide_200x60.png": (200, 60, 15, "RGB"),
    "rgba_64x48.png": (64, 48, 16, "RGBA"),
    "photo_112x84.jpg": (112, 84, 17, "RGB"),
}
JPEG_DECODED = "photo_112x84.jpg.rgb.png"  # PIL's decode of the JPEG, for resizer tests from decoded RGB


def synth_image(w, h, seed, mode):
    rng = np.random.Generator(np.random.PCG64(seed))
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.zeros((h, w, 3))
    for c in range(3):
        a, b, ph = rng.random(3)
        img[..., c] = 255 * (0.5 + 0.25 * np.sin(2 * math.pi * (a * x / w + b * y / h) * 2 + 6 * ph)
                             + 0.2 * (x / w if c != 1 else y / h))
    for _ in range(4):  # circles
        cx, cy, r = rng.random() * w, rng.random() * h, (0.1 + 0.25 * rng.random()) * min(w, h)
        col = rng.random(3) * 255
        img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = col
    for _ in range(3):  # rectangles
        x0, y0 = int(rng.random() * w), int(rng.random() * h)
        x1, y1 = x0 + int(rng.random() * w / 3) + 2, y0 + int(rng.random() * h / 3) + 2
        img[y0:y1, x0:x1] = rng.random(3) * 255
    img += rng.standard_normal((h, w, 3)) * 12
    img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    if mode == "RGBA":
        alpha = np.clip(255 * (x / w) + rng.standard_normal((h, w)) * 20, 0, 255).astype(np.uint8)
        img = np.dstack([img, alpha])
    return Image.fromarray(img, mode)


def write_images():
    """Creates missing test images. Existing files are kept: the committed bytes are the reference (a
    different libjpeg/zlib would otherwise change them)."""
    os.makedirs(IMG_DIR, exist_ok=True)
    for name, (w, h, seed, mode) in IMAGES.items():
        p = os.path.join(IMG_DIR, name)
        if os.path.exists(p):
            continue
        im = synth_image(w, h, seed, mode)
        if name.endswith(".jpg"):
            im.save(p, quality=90, subsampling=2)  # 4:2:0, the common case
            Image.open(p).convert("RGB").save(os.path.join(IMG_DIR, JPEG_DECODED), optimize=False)
        else:
            im.save(p, optimize=False)


# ----------------------------------------------------------------------------------------------------
# Cases. Messages are OpenAI-style; image URLs are repository-relative paths. A per-image max_pixels
# (qwen-vl-utils style key on the content item) is also given to the processor for that call.

def _img(name, **extra):
    d = {"type": "image_url", "image_url": {"url": IMG_REL + name}}
    d.update(extra)
    return d


def _txt(t):
    return {"type": "text", "text": t}


CASES = {
    "text": [{"role": "user", "content": "Write a haiku about autumn leaves."}],
    "image": [{"role": "user", "content": [_img("grad_224.png"), _txt("Describe this image.")]}],
    "image_odd": [{"role": "user", "content": [_img("odd_150x97.png"), _txt("What is in the picture?")]}],
    "image_tiny": [{"role": "user", "content": [_img("tiny_40x30.png"), _txt("What color is it?")]}],
    "two_images": [{"role": "user", "content": [_img("grad_112.png"), _img("odd_150x97.png"),
                                                  _txt("Compare the two images.")]}],
    "multiturn": [
        {"role": "system", "content": "You are a careful assistant. Answer briefly."},
        {"role": "user", "content": [_img("wide_200x60.png"), _txt("What do you see?")]},
        {"role": "assistant", "content": "A wide picture with a few colored shapes."},
        {"role": "user", "content": "Which shape is the largest?"},
    ],
    "max_pixels": [{"role": "user", "content": [_img("grad_224.png", max_pixels=56 * 56 * 4),
                                                  _txt("Describe this image briefly.")]}],
    "rgba": [{"role": "user", "content": [_img("rgba_64x48.png"), _txt("Describe it.")]}],
    "jpeg": [{"role": "user", "content": [_img("photo_112x84.jpg"), _txt("Describe the photo.")]}],
}
MODEL_CASES = {
    "tiny-f32-tied": list(CASES),
    "tiny-bf16-untied": ["text", "image", "image_odd", "two_images"],
    "small-f32-hd32": ["text", "image", "image_odd", "two_images"],
}


def image_paths(messages):
    return [p["image_url"]["url"] for m in messages if not isinstance(m["content"], str)
            for p in m["content"] if p["type"] == "image_url"]


def hf_messages(messages):
    """OpenAI-style -> the HF chat-template form; returns (messages, image paths, max_pixels or None)."""
    out, paths, maxp = [], [], None
    for m in messages:
        c = m["content"]
        if isinstance(c, str):
            out.append({"role": m["role"], "content": c})
            continue
        parts = []
        for p in c:
            if p["type"] == "image_url":
                parts.append({"type": "image"})
                paths.append(p["image_url"]["url"])
                if "max_pixels" in p:
                    if maxp is not None and maxp != p["max_pixels"]:
                        raise ValueError("one max_pixels per case")
                    maxp = p["max_pixels"]
            else:
                parts.append({"type": "text", "text": p["text"]})
        out.append({"role": m["role"], "content": parts})
    return out, paths, maxp


# ----------------------------------------------------------------------------------------------------

def make_processor(model_dir):
    """Qwen2VLProcessor with the PIL image processor. The processor insists on a video processor, whose
    class needs torchvision (not installed, and never used here), so that one argument check is skipped."""
    ip = pil_ip.Qwen2VLImageProcessorPil.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    orig = Qwen2VLProcessor.check_argument_for_proper_class

    def check(self, name, arg):
        if name == "video_processor" and arg is None:
            return None
        return orig(self, name, arg)

    Qwen2VLProcessor.check_argument_for_proper_class = check
    try:
        proc = Qwen2VLProcessor(image_processor=ip, tokenizer=tok, video_processor=None,
                                chat_template=tok.chat_template)
    finally:
        Qwen2VLProcessor.check_argument_for_proper_class = orig
    return proc


def sha256_file(p):
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def load_model(model_dir, dtype):
    m, info = Qwen2VLForConditionalGeneration.from_pretrained(
        model_dir, attn_implementation="eager", dtype=dtype, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}
    if bad:
        raise RuntimeError(f"{model_dir}: loading problems {bad}")
    return m.eval()


def rope_positions(model, inputs):
    ids = inputs["input_ids"]
    if inputs.get("image_grid_thw") is None:
        n = ids.shape[1]
        return [list(range(n))] * 3, 0
    pos, delta = model.model.get_rope_index(ids, mm_token_type_ids=inputs["mm_token_type_ids"],
                                            image_grid_thw=inputs["image_grid_thw"],
                                            attention_mask=inputs["attention_mask"])
    return pos[:, 0, :].tolist(), int(delta.reshape(-1)[0])


@torch.no_grad()
def greedy(model, inputs, n):
    """Greedy decoding of n tokens ignoring EOS; returns (ids, [raw logits per step as f32 numpy])."""
    out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=1,
                         repetition_penalty=1.0, temperature=None, top_k=None, top_p=None,
                         output_logits=True, return_dict_in_generate=True)
    ids = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    logits = [l[0].float().numpy() for l in out.logits]
    assert len(ids) == n and len(logits) == n
    for i, (t, l) in enumerate(zip(ids, logits)):
        # min_new_tokens masks EOS in the processed scores only; make sure it never changed the choice.
        if int(np.argmax(l)) != t:
            raise RuntimeError(f"step {i}: generated {t} but raw argmax is {int(np.argmax(l))}")
    return ids, logits


INTERMEDIATE_CASES = ("text", "image", "two_images")  # cases that also store per-layer activations


@torch.no_grad()
def intermediates(model, inputs):
    """Per-layer activations of one prompt forward, captured with hooks (float32 numpy):
    decoder [L+2, n, H]: 0 = decoder input embeddings (image rows already scattered in), l = residual
    stream after layer l, L+1 = after the final RMSNorm; vision [depth+1, Np, E] (image cases):
    0 = patch embedding output, b+1 = after block b (the merger output is image_embeds.npy)."""
    lm = model.model.language_model
    dec, vis, hooks = [], [], []
    hooks.append(lm.layers[0].register_forward_pre_hook(lambda m, a, k: dec.append(
        (a[0] if a else k["hidden_states"]).detach().clone()), with_kwargs=True))
    for layer in lm.layers:
        hooks.append(layer.register_forward_hook(lambda m, a, o: dec.append(
            (o[0] if isinstance(o, tuple) else o).detach().clone())))
    hooks.append(lm.norm.register_forward_hook(lambda m, a, o: dec.append(o.detach().clone())))
    blocks = model.model.visual.blocks
    hooks.append(blocks[0].register_forward_pre_hook(lambda m, a, k: vis.append(
        (a[0] if a else k["hidden_states"]).detach().clone()), with_kwargs=True))
    for b in blocks:
        hooks.append(b.register_forward_hook(lambda m, a, o: vis.append(
            (o[0] if isinstance(o, tuple) else o).detach().clone())))
    try:
        model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    d = np.stack([t.float().reshape(-1, t.shape[-1]).numpy() for t in dec]).astype(np.float32)
    v = np.stack([t.float().reshape(-1, t.shape[-1]).numpy() for t in vis]).astype(np.float32) if vis else None
    return d, v


@torch.no_grad()
def default_generation(model, inputs, n, **overrides):
    """generate() with the checkpoint's generation_config.json (the released Instruct values: do_sample,
    top_k 1, top_p 0.001, temperature 0.1, repetition_penalty 1.05), n tokens with EOS suppressed by
    min_new_tokens. top_k = 1 makes it deterministic: the argmax of the penalised logits (SPEC §A.6).
    Each step is re-derived from the raw logits to confirm that reading, and that EOS never won."""
    gc = model.generation_config
    out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, output_logits=True,
                         return_dict_in_generate=True, **overrides)
    prompt = inputs["input_ids"][0].tolist()
    ids = out.sequences[0, len(prompt):].tolist()
    p = float(overrides.get("repetition_penalty", gc.repetition_penalty))
    gaps, tied = [], []
    for i, l in enumerate(out.logits):
        raw = l[0].float().numpy().copy()
        seen = np.array(sorted(set(prompt + ids[:i])))
        v = raw[seen]
        raw[seen] = np.where(v < 0, v * np.float32(p), v / np.float32(p))
        if raw[ids[i]] != raw.max():
            raise RuntimeError(f"default generation step {i}: {ids[i]} is not the penalised argmax")
        if np.count_nonzero(raw == raw.max()) > 1:
            tied.append(i)  # top_k=1 sampling breaks exact ties through torch.topk, not lowest-id-first
        gaps.append(top2_gap(raw))
    r = {"ids": ids, "repetition_penalty": p, "min_top2_gap_penalised": min(gaps), "tied_steps": tied,
         "note": "EOS suppressed (min_new_tokens); ids = argmax of penalised logits, checked per step; "
                 "tied_steps: exact ties of the maximum (the choice there is implementation-defined)"}
    if not overrides:
        r.update({"top_k": gc.top_k, "top_p": gc.top_p, "temperature": gc.temperature,
                  "do_sample": gc.do_sample})
    else:
        r.update(overrides)
    return r


def top2_gap(l):
    s = np.sort(l)
    return float(s[-1] - s[-2])


def run_case(model_name, case, model, model_f32, proc, model_dir, spec):
    messages = CASES[case]
    hmsgs, paths, maxp = hf_messages(messages)
    prompt = proc.apply_chat_template(hmsgs, add_generation_prompt=True, tokenize=False)
    images = [Image.open(os.path.join(ROOT, p)) for p in paths] or None
    kw = {"images_kwargs": {"max_pixels": maxp}} if maxp is not None else {}
    inputs = proc(text=[prompt], images=images, return_tensors="pt", **kw)
    ids = inputs["input_ids"][0].tolist()
    positions, delta = rope_positions(model, inputs)

    with torch.no_grad():
        logits0 = model(**inputs).logits[0, -1].float().numpy()
    gids, steps = greedy(model, inputs, N_GREEDY)
    # generate() computes the prefill logits for the last position only (different matmul shapes), so
    # the reference itself differs from the plain forward by rounding noise; recorded as a scale.
    step0_diff = float(np.max(np.abs(steps[0] - logits0)))
    gaps = [top2_gap(l) for l in steps]
    top5 = []
    for l in steps:
        o = np.argsort(-l, kind="stable")[:5]
        top5.append({"ids": [int(i) for i in o], "values": [float(l[i]) for i in o]})

    out_dir = os.path.join(FIX_DIR, model_name, case)
    os.makedirs(out_dir, exist_ok=True)
    for f in os.listdir(out_dir):
        os.remove(os.path.join(out_dir, f))
    np.save(os.path.join(out_dir, "logits0.npy"), logits0.astype(np.float32))

    cj = {
        "model": model_name,
        "messages": messages,
        "prompt_text": prompt,
        "prompt_ids": ids,
        "n_prompt": len(ids),
        "image_grid_thw": inputs["image_grid_thw"].tolist() if "image_grid_thw" in inputs else [],
        "position_ids": positions,
        "rope_delta": delta,
        "greedy_ids": gids,
        "greedy_text": proc.tokenizer.decode(gids, skip_special_tokens=False),
        "greedy_top5": top5,
        "top2_gaps": gaps,
        "min_top2_gap": min(gaps),
        "logits0_top2_gap": top2_gap(logits0),
        "generate_step0_vs_forward_max_abs": step0_diff,
        "dtype": spec["dtype"],
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "image_processor": "Qwen2VLImageProcessorPil (PIL bicubic path)",
        "model_sha256": {f: sha256_file(os.path.join(model_dir, f))
                         for f in make_model.shard_names(spec["shards"])},
    }
    if maxp is not None:
        cj["images_kwargs"] = {"max_pixels": maxp}
    if "pixel_values" in inputs:
        pv = inputs["pixel_values"].float()
        pvn = np.ascontiguousarray(pv.numpy().astype(np.float32))
        h = hashlib.sha256(pvn.tobytes()).hexdigest()
        # The processor config is the same for every test model, so identical pixel values are stored
        # once; "file" always names the .npy to load (repository-relative).
        rel = PV_INDEX.get(h)
        if rel is None or not os.path.exists(os.path.join(ROOT, rel)):
            np.save(os.path.join(out_dir, "pixel_values.npy"), pvn)
            rel = os.path.relpath(os.path.join(out_dir, "pixel_values.npy"), ROOT)
            PV_INDEX[h] = rel
        cj["pixel_values"] = {"file": rel, "sha256_f32": h, "shape": list(pv.shape),
                              "sum": float(pv.double().sum()), "abs_sum": float(pv.double().abs().sum())}
        with torch.no_grad():
            feats = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
            emb = torch.cat(list(feats.pooler_output), dim=0).float().numpy()
        np.save(os.path.join(out_dir, "image_embeds.npy"), emb.astype(np.float32))
        cj["image_embeds_shape"] = list(emb.shape)
        cj["image_sizes"] = [list(Image.open(os.path.join(ROOT, p)).size) for p in paths]  # (W, H)
    cj["default_generation"] = default_generation(model, inputs, N_GREEDY)
    # A strong penalty (vLLM-style per-request repetition_penalty) so the penalty visibly changes tokens.
    cj["penalty_generation"] = default_generation(model, inputs, N_GREEDY, do_sample=False,
                                                  repetition_penalty=1.5, temperature=None, top_k=None,
                                                  top_p=None)
    if case in INTERMEDIATE_CASES:
        # bf16 models: from the f32 upcast (what an f32-compute runtime should match)
        src, suffix = (model_f32, "_f32ref") if model_f32 is not None else (model, "")
        dh, vh = intermediates(src, inputs)
        np.save(os.path.join(out_dir, f"hidden_states{suffix}.npy"), dh)
        cj["hidden_states_shape"] = list(dh.shape)
        if vh is not None:
            np.save(os.path.join(out_dir, f"vision_hidden{suffix}.npy"), vh)
            cj["vision_hidden_shape"] = list(vh.shape)
    if model_f32 is not None:
        with torch.no_grad():
            l32 = model_f32(**inputs).logits[0, -1].float().numpy()
        np.save(os.path.join(out_dir, "logits0_f32ref.npy"), l32.astype(np.float32))
        g32, steps32 = greedy(model_f32, inputs, N_GREEDY)
        cj["greedy_ids_f32ref"] = g32
        cj["top2_gaps_f32ref"] = [top2_gap(l) for l in steps32]
        cj["min_top2_gap_f32ref"] = min(cj["top2_gaps_f32ref"])
        cj["logits0_bf16_vs_f32ref_max_abs"] = float(np.max(np.abs(logits0 - l32)))
        cj["logits0_f32ref_max_abs"] = float(np.max(np.abs(l32)))
        cj["greedy_agree_with_f32ref"] = sum(1 for a, b in zip(gids, g32) if a == b)
        if "pixel_values" in inputs:
            with torch.no_grad():
                f = model_f32.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
                e32 = torch.cat(list(f.pooler_output), dim=0).float().numpy()
            np.save(os.path.join(out_dir, "image_embeds_f32ref.npy"), e32.astype(np.float32))
            cj["image_embeds_bf16_vs_f32ref_max_abs"] = float(np.max(np.abs(emb - e32)))
    with open(os.path.join(out_dir, "case.json"), "w", encoding="utf-8") as f:
        json.dump(cj, f, indent=1, ensure_ascii=False)
        f.write("\n")
    return cj


# ----------------------------------------------------------------------------------------------------

def smart_resize_cases():
    F = 28
    dmin, dmax_inst, dmax_cls = 3136, 12845056, 1003520
    rows = []

    def add(h, w, mn=dmin, mx=dmax_inst, note=""):
        rows.append((h, w, mn, mx, note))

    for h, w in [(224, 224), (333, 517), (70, 100), (28, 28), (1080, 1920), (4000, 3000), (56, 56),
                 (28, 56), (280, 280), (560, 840)]:
        add(h, w, note="worked/multiple")
        add(h, w, mx=dmax_cls, note="class default max")
    for h in [42, 70, 98, 126, 154, 182, 14 * 29, 14 * 31]:  # exact .5 ties: half-to-even
        add(h, 224, note="round half")
        add(224, h, note="round half")
    for h, w in [(28, 5600), (5600, 28), (29, 5800), (28, 5601), (30, 6001), (100, 20000), (20001, 100)]:
        add(h, w, mx=10 ** 12, note="aspect near 200")
    for h, w in [(20, 30), (10, 10), (27, 400), (1, 28)]:
        add(h, w, note="side below factor")
    for mx in [3136, 12544, 50176, 200704, 1003520]:
        for h, w in [(224, 224), (1000, 700), (97, 150), (3000, 40), (40, 3000)]:
            add(h, w, mx=mx, note="max branch")
    for mn in [3136, 12544, 200704, 1003520]:
        for h, w in [(30, 40), (28, 28), (50, 5000), (60, 90)]:
            add(h, w, mn=mn, mx=max(mn * 4, dmax_inst), note="min branch")
    add(1000, 1000, mx=784, note="max below one merged patch")
    add(300, 30, mx=1568, note="max floors a side to 0 without the clamp")
    rng = np.random.Generator(np.random.PCG64(99))
    while len(rows) < 200:
        h, w = int(rng.integers(28, 4000)), int(rng.integers(28, 4000))
        mn = int(rng.choice([3136, 12544, 65536]))
        mx = int(rng.choice([12544, 200704, 1003520, 12845056]))
        add(h, w, mn=mn, mx=mx, note="random")
    out = []
    for h, w, mn, mx, note in rows:
        r = {"height": h, "width": w, "min_pixels": mn, "max_pixels": mx, "note": note}
        try:
            rh, rw = pil_ip.smart_resize(h, w, factor=F, min_pixels=mn, max_pixels=mx)
            r["resized"] = [int(rh), int(rw)]
        except ValueError as e:
            r["error"] = str(e)
        out.append(r)
    return {
        "reference": f"transformers {transformers.__version__} "
                     "models/qwen2_vl/image_processing_pil_qwen2_vl.smart_resize, factor 28",
        "notes": ("This version raises only for aspect ratio > 200; sides below 28 are accepted (older "
                  "4.x versions raised 'height/width must be larger than factor'); in the max branch each "
                  "side is clamped to >= 28 (older versions could floor a side to 0)."),
        "cases": out,
    }


RESIZE_TARGETS = {  # source image -> extra (h, w) targets besides its smart_resize size
    "grad_224.png": [(112, 112), (56, 56), (28, 224)],
    "odd_150x97.png": [(28, 56), (112, 168)],
    "tiny_40x30.png": [(28, 28), (84, 112)],
    "wide_200x60.png": [(56, 112), (84, 252)],
    "rgba_64x48.png": [(28, 84)],
    JPEG_DECODED: [(56, 56)],
}


def write_resize_fixtures():
    """PIL bicubic resizes of the decoded RGB test images (the uint8 step before rescale/normalise),
    as PNGs under resize/ plus resize.json. RGBA sources are first composited on white like 5.x's
    convert_to_rgb; the JPEG is represented by its Pillow decode."""
    out_dir = os.path.join(FIX_DIR, "resize")
    os.makedirs(out_dir, exist_ok=True)
    for f in os.listdir(out_dir):
        os.remove(os.path.join(out_dir, f))
    rows = []
    for name, extra in RESIZE_TARGETS.items():
        im = Image.open(os.path.join(IMG_DIR, name))
        conv = "none"
        if "A" in im.getbands():
            im = Image.fromarray(composite_on_white(np.asarray(im.convert("RGBA"))), "RGB")
            conv = "alpha composited on white"
        else:
            im = im.convert("RGB")
        W0, H0 = im.size
        targets = [np_smart_resize(H0, W0, 3136, 12845056)] + list(extra)
        for h, w in targets:
            fn = f"{os.path.splitext(name)[0]}_{h}x{w}.png"
            r = im.resize((w, h), Image.BICUBIC)
            r.save(os.path.join(out_dir, fn), optimize=False)
            rows.append({"source": IMG_REL + name, "source_size_wh": [W0, H0], "rgb_conversion": conv,
                         "target_hw": [h, w], "file": os.path.relpath(os.path.join(out_dir, fn), ROOT),
                         "sha256_rgb": hashlib.sha256(np.asarray(r).tobytes()).hexdigest()})
    with open(os.path.join(FIX_DIR, "resize.json"), "w") as f:
        json.dump({"reference": f"Pillow {Image.__version__ if hasattr(Image, '__version__') else ''} "
                                "Image.resize((w, h), BICUBIC) on uint8 RGB (what transformers' PIL path "
                                "calls); the first target of each source is its smart_resize size",
                   "cases": rows}, f, indent=1)
        f.write("\n")


def rope_index_cases(model):
    T = 100  # arbitrary text token ids

    def seq(*parts):
        ids, grids = [], []
        for p in parts:
            if isinstance(p, int):
                ids += [T + len(ids) + i for i in range(p)]
            else:
                t, h, w = p
                ids += [VISION_START] + [IMAGE_PAD] * (t * h * w // 4) + [VISION_END]
                grids.append([t, h, w])
        return ids, grids

    specs = [
        ("text only", seq(7)),
        ("spec C.3 one image", seq(2, (1, 4, 6), 1)),
        ("spec C.3 two images", seq(1, (1, 4, 4), (1, 2, 4), 1)),
        ("image first", seq(0, (1, 6, 4), 3)),
        ("image last", seq(5, (1, 8, 8))),
        ("224x224 in chat", seq(14, (1, 16, 16), 10)),
        ("tall then wide", seq(3, (1, 12, 2), 4, (1, 2, 14), 2)),
        ("three images", seq(2, (1, 4, 4), 1, (1, 6, 10), 3, (1, 2, 2), 2)),
    ]
    out = []
    for name, (ids, grids) in specs:
        t = torch.tensor([ids])
        types = (t == IMAGE_PAD).long() + 2 * (t == VIDEO_PAD).long()
        if grids:
            pos, delta = model.model.get_rope_index(t, mm_token_type_ids=types,
                                                    image_grid_thw=torch.tensor(grids),
                                                    attention_mask=torch.ones_like(t))
            pos, delta = pos[:, 0, :].tolist(), int(delta.reshape(-1)[0])
        else:
            pos, delta = [list(range(len(ids)))] * 3, 0
        out.append({"name": name, "input_ids": ids, "image_grid_thw": grids, "spatial_merge_size": 2,
                    "position_ids": pos, "rope_delta": delta})
    return {"reference": f"transformers {transformers.__version__} Qwen2VLModel.get_rope_index "
                         "(mm_token_type_ids: 1 for <|image_pad|>)", "cases": out}


# ----------------------------------------------------------------------------------------------------
# Independent numpy (float64) re-implementation of SPEC §B-§D, used as a cross-check of the fixtures:
# it reads the checkpoint files directly, so it also checks the safetensors bytes and the name mapping.

def np_load_checkpoint(model_dir, spec):
    files = make_model.shard_names(spec["shards"])
    W = {}
    for fn in files:
        with open(os.path.join(model_dir, fn), "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            hdr = json.loads(f.read(n))
            base = 8 + n
            for name, meta in hdr.items():
                if name == "__metadata__":
                    continue
                b, e = meta["data_offsets"]
                f.seek(base + b)
                raw = f.read(e - b)
                if meta["dtype"] == "F32":
                    a = np.frombuffer(raw, "<f4")
                elif meta["dtype"] == "BF16":
                    a = make_model.bf16_bits_to_f32(np.frombuffer(raw, "<u2"))
                else:
                    raise ValueError(meta["dtype"])
                # old naming is the canonical one here (SPEC §A.4 mapping, reversed)
                if name.startswith("model.language_model."):
                    name = "model." + name[len("model.language_model."):]
                elif name.startswith("model.visual."):
                    name = name[len("model."):]
                W[name] = a.reshape(meta["shape"]).astype(np.float64)
    return W


def _erf(x):
    return np.frompyfunc(math.erf, 1, 1)(x).astype(np.float64)


def _layernorm(x, w, b, eps=1e-6):
    m = x.mean(-1, keepdims=True)
    v = ((x - m) ** 2).mean(-1, keepdims=True)
    return (x - m) / np.sqrt(v + eps) * w + b


def _rmsnorm(x, w, eps=1e-6):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _rot(x, cos, sin):
    h = x.shape[-1] // 2
    return x * cos + np.concatenate([-x[..., h:], x[..., :h]], -1) * sin


def np_vision(W, spec, pv, grids, trace=None):
    v = spec["vision"]
    E, nh, m = v["embed_dim"], v["num_heads"], v["spatial_merge_size"]
    hd = E // nh
    x = pv.astype(np.float64) @ W["visual.patch_embed.proj.weight"].reshape(E, -1).T
    # 2-D rotary (SPEC §D.4): hd/4 inverse frequencies, angles (row·f, col·f), duplicated for rotate_half
    inv = 1.0 / (10000.0 ** (np.arange(0, hd // 2, 2, dtype=np.float64) / (hd // 2)))
    rows, cols, segs = [], [], [0]
    for t, gh, gw in grids:
        for _ in range(t):
            for bh in range(gh // m):
                for bw in range(gw // m):
                    for mh in range(m):
                        for mw in range(m):
                            rows.append(bh * m + mh)
                            cols.append(bw * m + mw)
            segs.append(segs[-1] + gh * gw)
    ang = np.concatenate([np.outer(rows, inv), np.outer(cols, inv)], -1)
    ang = np.concatenate([ang, ang], -1)
    # HF computes the vision rotary table in float32
    ang = ang.astype(np.float32).astype(np.float64)
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    if trace is not None:
        trace.append(x)
    for b in range(v["depth"]):
        p = f"visual.blocks.{b}."
        a = _layernorm(x, W[p + "norm1.weight"], W[p + "norm1.bias"])
        qkv = a @ W[p + "attn.qkv.weight"].T + W[p + "attn.qkv.bias"]
        q, k, vv = [qkv[:, i * E:(i + 1) * E].reshape(-1, nh, hd) for i in range(3)]
        q, k = _rot(q, cos, sin), _rot(k, cos, sin)
        o = np.zeros_like(q)
        for s0, s1 in zip(segs[:-1], segs[1:]):
            sc = np.einsum("qhd,khd->hqk", q[s0:s1], k[s0:s1]) / math.sqrt(hd)
            sc = np.exp(sc - sc.max(-1, keepdims=True))
            sc /= sc.sum(-1, keepdims=True)
            o[s0:s1] = np.einsum("hqk,khd->qhd", sc, vv[s0:s1])
        x = x + o.reshape(-1, E) @ W[p + "attn.proj.weight"].T + W[p + "attn.proj.bias"]
        a = _layernorm(x, W[p + "norm2.weight"], W[p + "norm2.bias"])
        h = a @ W[p + "mlp.fc1.weight"].T + W[p + "mlp.fc1.bias"]
        h = h / (1.0 + np.exp(-1.702 * h))
        x = x + h @ W[p + "mlp.fc2.weight"].T + W[p + "mlp.fc2.bias"]
        if trace is not None:
            trace.append(x)
    x = _layernorm(x, W["visual.merger.ln_q.weight"], W["visual.merger.ln_q.bias"]).reshape(-1, E * m * m)
    h = x @ W["visual.merger.mlp.0.weight"].T + W["visual.merger.mlp.0.bias"]
    h = 0.5 * h * (1.0 + _erf(h / math.sqrt(2.0)))
    return h @ W["visual.merger.mlp.2.weight"].T + W["visual.merger.mlp.2.bias"]


def np_decoder_last_logits(W, spec, ids, positions, image_embeds=None, trace=None):
    t = spec["text"]
    H, nh, kvh = t["hidden"], t["heads"], t["kv_heads"]
    hd = H // nh
    x = W["model.embed_tokens.weight"][np.asarray(ids)]
    if image_embeds is not None:
        x[np.asarray(ids) == IMAGE_PAD] = image_embeds
    # M-RoPE (SPEC §C.1): frequency j uses the t/h/w stream by section; f32 angles like HF
    inv = (1.0 / (np.float32(1e6) ** (np.arange(0, hd, 2, dtype=np.int64).astype(np.float32) / hd))).astype(
        np.float32)
    stream = np.repeat(np.arange(3), t["mrope_section"])
    pos = np.asarray(positions, dtype=np.float32)  # [3, n]
    ang = (pos[stream, :].T * inv[None, :]).astype(np.float64)  # [n, hd/2], f32 product
    ang = np.concatenate([ang, ang], -1)
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    n = len(ids)
    mask = np.triu(np.full((n, n), -np.inf), 1)
    if trace is not None:
        trace.append(x.copy())
    for l in range(t["layers"]):
        p = f"model.layers.{l}."
        a = _rmsnorm(x, W[p + "input_layernorm.weight"])
        q = (a @ W[p + "self_attn.q_proj.weight"].T + W[p + "self_attn.q_proj.bias"]).reshape(n, nh, hd)
        k = (a @ W[p + "self_attn.k_proj.weight"].T + W[p + "self_attn.k_proj.bias"]).reshape(n, kvh, hd)
        v = (a @ W[p + "self_attn.v_proj.weight"].T + W[p + "self_attn.v_proj.bias"]).reshape(n, kvh, hd)
        q, k = _rot(q, cos, sin), _rot(k, cos, sin)
        k, v = np.repeat(k, nh // kvh, axis=1), np.repeat(v, nh // kvh, axis=1)
        sc = np.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd) + mask
        sc = np.exp(sc - sc.max(-1, keepdims=True))
        sc /= sc.sum(-1, keepdims=True)
        o = np.einsum("hqk,khd->qhd", sc, v).reshape(n, H)
        x = x + o @ W[p + "self_attn.o_proj.weight"].T
        b = _rmsnorm(x, W[p + "post_attention_layernorm.weight"])
        g = b @ W[p + "mlp.gate_proj.weight"].T
        x = x + ((g / (1.0 + np.exp(-g))) * (b @ W[p + "mlp.up_proj.weight"].T)) @ W[p + "mlp.down_proj.weight"].T
        if trace is not None:
            trace.append(x.copy())
    if trace is not None:
        trace.append(_rmsnorm(x, W["model.norm.weight"]))
    h = _rmsnorm(x[-1], W["model.norm.weight"])
    head = W["model.embed_tokens.weight"] if spec["tied"] else W["lm_head.weight"]
    return head @ h


def composite_on_white(rgba):
    """transformers 5.x convert_to_rgb: PIL alpha_composite of the image over opaque white, then RGB.
    Pillow's integer arithmetic (AlphaComposite.c, 7 extra precision bits) reduces for an opaque white
    destination to out = div255((c·a + 255·(255 − a) + 128)·128) >> 7 with div255(x) = ((x >> 8) + x) >> 8
    (a = 0 gives 255); checked equal to Pillow for all 65536 (c, a) pairs."""
    c = rgba[..., :3].astype(np.uint32)
    a = rgba[..., 3:4].astype(np.uint32)
    t = (c * a + 255 * (255 - a) + 128) * 128
    out = (((t >> 8) + t) >> 8) >> 7
    return np.where(a == 0, 255, out).astype(np.uint8)


def np_smart_resize(h, w, mn, mx, f=28):
    """SPEC §E.2 as transcribed (Python round = half-to-even), with the 5.x clamp in the max branch."""
    if max(h, w) / min(h, w) > 200:
        raise ValueError("aspect")
    hb, wb = round(h / f) * f, round(w / f) * f
    if hb * wb > mx:
        beta = math.sqrt(h * w / mx)
        hb, wb = max(f, math.floor(h / beta / f) * f), max(f, math.floor(w / beta / f) * f)
    elif hb * wb < mn:
        beta = math.sqrt(mn / (h * w))
        hb, wb = math.ceil(h * beta / f) * f, math.ceil(w * beta / f) * f
    return hb, wb


def np_pixel_values(path, max_pixels=12845056, min_pixels=3136):
    """SPEC §E.1/E.4 from the file: RGB conversion (alpha composited on white, see composite_on_white),
    PIL bicubic resize, x/255, (x - mean)/std in float32, two identical frames, merge-window order."""
    im = Image.open(path)
    if "A" in im.getbands() or im.info.get("transparency") is not None:
        im = Image.fromarray(composite_on_white(np.asarray(im.convert("RGBA"))), "RGB")
    else:
        im = im.convert("RGB")
    W0, H0 = im.size
    h, w = np_smart_resize(H0, W0, min_pixels, max_pixels)
    a = np.asarray(im.resize((w, h), Image.BICUBIC) if (w, h) != (W0, H0) else im, dtype=np.uint8)
    x = (a.astype(np.float64) / 255.0).astype(np.float32)
    mean = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
    std = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
    x = ((x - mean) / std).astype(np.float32).transpose(2, 0, 1)  # [c, y, x]
    gh, gw = h // 14, w // 14
    out = np.empty((gh * gw, 3 * 2 * 14 * 14), np.float32)
    k = 0
    for bh in range(gh // 2):
        for bw in range(gw // 2):
            for mh in range(2):
                for mw in range(2):
                    r, c = 2 * bh + mh, 2 * bw + mw
                    patch = x[:, 14 * r:14 * r + 14, 14 * c:14 * c + 14]  # [3, 14, 14]
                    out[k] = np.stack([patch, patch], 1).reshape(-1)  # (c, tau, y, x)
                    k += 1
    return out, [1, gh, gw]


def np_rope_index(ids, grids, m=2):
    """SPEC §C.2 transcribed: text runs continue from 1 + max so far; image pads get (t, row, col)
    offsets from the run start; delta = max + 1 - n."""
    pos, i, g = [[], [], []], 0, 0
    nxt = 0
    while i < len(ids):
        if ids[i] == IMAGE_PAD:
            t, h, w = grids[g]
            g += 1
            for a in range(t):
                for r in range(h // m):
                    for c in range(w // m):
                        for s, v in zip(pos, (a, r, c)):
                            s.append(nxt + v)
            i += t * (h // m) * (w // m)
        else:
            for s in pos:
                s.append(nxt)
            i += 1
        nxt = max(max(s) for s in pos) + 1
    return pos, nxt - len(ids)


def verify_tables():
    bad = 0
    for r in json.load(open(os.path.join(FIX_DIR, "smart_resize.json")))["cases"]:
        try:
            got = list(np_smart_resize(r["height"], r["width"], r["min_pixels"], r["max_pixels"]))
        except ValueError:
            got = None
        bad += got != r.get("resized")
    rb = 0
    for c in json.load(open(os.path.join(FIX_DIR, "rope_index.json")))["cases"]:
        pos, d = np_rope_index(c["input_ids"], c["image_grid_thw"])
        rb += (pos != c["position_ids"]) or (d != c["rope_delta"])
    print(f"numpy check tables: smart_resize mismatches {bad}, rope_index mismatches {rb}")
    return {"smart_resize_mismatches": bad, "rope_index_mismatches": rb}


def verify_numpy(models_dir, names):
    """Recomputes logits0 (and image_embeds) of every committed case in float64 numpy and reports the
    largest differences from the torch reference (bf16 models: against logits0_f32ref)."""
    report = {}
    for name in names:
        spec = make_model.resolve_spec(name)
        W = np_load_checkpoint(os.path.join(models_dir, name), spec)
        for case in MODEL_CASES[name]:
            d = os.path.join(FIX_DIR, name, case)
            cj = json.load(open(os.path.join(d, "case.json")))
            emb = None
            r = {}
            if cj.get("pixel_values"):
                pv = np.load(os.path.join(ROOT, cj["pixel_values"]["file"]))
                mp = cj.get("images_kwargs", {}).get("max_pixels", 12845056)
                mine = [np_pixel_values(os.path.join(ROOT, m), mp) for m in image_paths(cj["messages"])]
                r["pixel_values_max_abs"] = float(np.max(np.abs(np.concatenate([m[0] for m in mine]) - pv)))
                r["grids_equal"] = [m[1] for m in mine] == cj["image_grid_thw"]
                vtr = []
                emb = np_vision(W, spec, pv, cj["image_grid_thw"], vtr)
                vf = os.path.join(d, "vision_hidden_f32ref.npy" if spec["dtype"] == "bf16" else "vision_hidden.npy")
                if os.path.exists(vf):
                    vref = np.load(vf)
                    r["vision_hidden_max_abs"] = [float(np.max(np.abs(a - b))) for a, b in zip(vtr, vref)]
                ref = np.load(os.path.join(d, "image_embeds_f32ref.npy" if spec["dtype"] == "bf16"
                                           else "image_embeds.npy"))
                r["image_embeds_max_abs"] = float(np.max(np.abs(emb - ref)))
                r["image_embeds_ref_max_abs"] = float(np.max(np.abs(ref)))
            dtr = []
            lg = np_decoder_last_logits(W, spec, cj["prompt_ids"], cj["position_ids"], emb, dtr)
            hf = os.path.join(d, "hidden_states_f32ref.npy" if spec["dtype"] == "bf16" else "hidden_states.npy")
            if os.path.exists(hf):
                href = np.load(hf)
                r["hidden_states_max_abs"] = [float(np.max(np.abs(a - b))) for a, b in zip(dtr, href)]
            refname = "logits0_f32ref.npy" if spec["dtype"] == "bf16" else "logits0.npy"
            ref = np.load(os.path.join(d, refname))
            pos, dl = np_rope_index(cj["prompt_ids"], cj["image_grid_thw"])
            r["positions_equal"] = pos == cj["position_ids"] and dl == cj["rope_delta"]
            r["logits0_max_abs"] = float(np.max(np.abs(lg - ref)))
            r["argmax_equal"] = int(np.argmax(lg)) == int(np.argmax(ref))
            report.setdefault(name, {})[case] = r
            print(f"numpy check {name}/{case} vs {refname}: {json.dumps(r)}", flush=True)
    return report


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(MODEL_CASES))
    ap.add_argument("--cases", default="", help="restrict to these cases (default: all of each model)")
    ap.add_argument("--models-dir", default="/tmp/vlmd-fixture-models")
    ap.add_argument("--skip-tables", action="store_true", help="do not rewrite smart_resize/rope_index")
    ap.add_argument("--verify-only", action="store_true",
                    help="only run the float64 numpy cross-check against the committed fixtures")
    a = ap.parse_args()
    if a.verify_only:
        names = a.models.split(",")
        for n in names:
            make_model.write_model(n, os.path.join(a.models_dir, n))
        verify_numpy(a.models_dir, names)
        verify_tables()
        return
    write_images()
    os.makedirs(FIX_DIR, exist_ok=True)
    index_pixel_values()
    summary_path = os.path.join(FIX_DIR, "summary.json")
    summary = json.load(open(summary_path)) if os.path.exists(summary_path) else {}
    rope_model = None
    for name in a.models.split(","):
        spec = make_model.resolve_spec(name)
        d = os.path.join(a.models_dir, name)
        make_model.write_model(name, d)
        tdtype = torch.bfloat16 if spec["dtype"] == "bf16" else torch.float32
        model = load_model(d, tdtype)
        model_f32 = load_model(d, torch.float32) if spec["dtype"] == "bf16" else None
        proc = make_processor(d)
        rope_model = rope_model or model
        cases = [c for c in MODEL_CASES[name] if not a.cases or c in a.cases.split(",")]
        for c in cases:
            cj = run_case(name, c, model, model_f32, proc, d, spec)
            line = {"n_prompt": cj["n_prompt"], "min_top2_gap": cj["min_top2_gap"],
                    "generate_step0_vs_forward_max_abs": cj["generate_step0_vs_forward_max_abs"]}
            for k in ("min_top2_gap_f32ref", "logits0_bf16_vs_f32ref_max_abs", "logits0_f32ref_max_abs", "greedy_agree_with_f32ref",
                      "image_embeds_bf16_vs_f32ref_max_abs"):
                if k in cj:
                    line[k] = cj[k]
            summary.setdefault(name, {})[c] = line
            print(f"{name}/{c}: {json.dumps(line)}", flush=True)
    if not a.skip_tables:
        write_resize_fixtures()
        with open(os.path.join(FIX_DIR, "smart_resize.json"), "w") as f:
            json.dump(smart_resize_cases(), f, indent=1)
            f.write("\n")
        if rope_model is not None:
            with open(os.path.join(FIX_DIR, "rope_index.json"), "w") as f:
                json.dump(rope_index_cases(rope_model), f, indent=1)
                f.write("\n")
    check_pixel_value_refs()
    names = [n for n in a.models.split(",")]
    for n, cases in verify_numpy(a.models_dir, names).items():
        for c, r in cases.items():
            summary.setdefault(n, {}).setdefault(c, {})["numpy_f64_check"] = r
    summary["numpy_f64_check_tables"] = verify_tables()
    summary["versions"] = {"transformers": transformers.__version__, "torch": torch.__version__,
                           "numpy": np.__version__}
    with open(summary_path, "w") as f:
        json.dump(summary, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
