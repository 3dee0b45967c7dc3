"""Train the vlmd demo model (issue 4): a tiny Qwen2-VL (real architecture, real Qwen tokenizer) that
answers questions about synthetic shapes images, written to configs/models/vlmd-demo/ in the Hugging Face
layout. CPU only, deterministic data (tools/demo_data.py, fixed seeds).

  python tools/train_demo.py                 # train (resumes from --work/state.pt if present), eval, write
  python tools/train_demo.py --eval-only     # evaluate the written checkpoint with transformers

Why the sizes: the Qwen tokenizer has ids up to 151668, so vocab_size >= 151669 and the (tied) embedding
dominates the checkpoint: 151680 x 32 x 2 bytes (bf16) = 9.7 MB; tokenizer.json is another 11.4 MB; the
checkpoint must stay <= 25 MB, so the decoder hidden size is 32 and everything else is small.
"""
import argparse
import json
import math
import os
import shutil
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import demo_data as dd  # noqa: E402

from transformers import (Qwen2VLConfig, Qwen2VLForConditionalGeneration,  # noqa: E402
                          Qwen2TokenizerFast, GenerationConfig)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOK_DIR = "/work/shared/tokenizers/qwen"
VOCAB = 151680             # >= 151669 (largest added-token id 151668 + 1), rounded up to a multiple of 16
MAX_PIXELS = 224 * 224     # at most 256 patches / 64 image tokens per image: fast, shapes stay >= ~7 px
MIN_PIXELS = 112 * 112     # upscales the smallest pictures (64 px sides) so their 16 px shapes span > 1 patch
IMAGE_TOKEN = 151655       # <|image_pad|>

# Model shape (docs/demo-model.md): decoder hidden 48 = 3 heads x 16, 4 layers, SwiGLU 192; the vision
# tower is 3 blocks of width 96 (3 heads, MLP ratio 2) merged 2x2 into 48.
HIDDEN, LAYERS, FFN, VDEPTH, VMLP, VHEADS = 48, 4, 192, 3, 2, 3
BATCH = 16
STEPS = 11600
# The training recipe that produced configs/models/vlmd-demo, as it was run. Each row holds from its first
# step to the next row's: the question mix (kinds cycle through the batch), the learning-rate phase
# (100 warm-up steps from phase_start, then a cosine from `peak` down to 5% of it at phase_end) and the
# weight of the dense vision loss (aux_labels). Why stages: trained on all three questions from the
# start, the model sat at the answer prior for thousands of steps (docs/demo-model.md); trained on
# "What shape is this?" alone it learns to see shapes in ~1000 steps, after which count and colour follow.
# Colour (binding a colour to the named shape) is learnt last, so the later rows weight it up, mostly with pictures of 2-3 shapes ("colorm").
STAGES = [
    # first step, mix,                            phase_start, phase_end, peak,  aux weight
    (0,     "shape",                              0,     1000,  1e-3,   0.0),
    (1000,  "shape,count,color,count,colorm",     1000,  7000,  1e-3,   0.5),
    (3500,  "colorm,count,color,colorm,shape",    1000,  7000,  1e-3,   0.5),
    (7000,  "colorm,colorm,count,color,shape",    7000,  10000, 5e-4,   0.5),
    (10000, "colorm,count,colorm,color,shape",    10000, 11000, 1.5e-4, 0.5),
    (11000, "count,colorm,count,color,shape",     11000, 11600, 1e-4,   0.5),
]
EMBED_LR_MULT = 10.0       # the tied embedding's step size relative to the rest (see train())
WEIGHT_DECAY = 0.05


def stage_at(step):
    return [st for st in STAGES if st[0] <= step][-1]


def lr_at(step):
    _first, _mix, p0, p1, peak, _aux = stage_at(step)
    return peak * min(1.0, (step - p0 + 1) / 100) * (0.5 * (1 + math.cos(math.pi * (step - p0) / (p1 - p0))) * 0.95 + 0.05)

# The Qwen2-VL chat template (SPEC F.2), replacing the Qwen3 one in the shared tokenizer_config.json.
QWEN2VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_config(hidden=32, layers=4, ffn=128, vdepth=3, vmlp=2, vheads=3):
    heads = hidden // 16
    return Qwen2VLConfig(
        text_config=dict(
            vocab_size=VOCAB, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=heads, head_dim=16, hidden_act="silu",
            max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
            bos_token_id=151643, eos_token_id=151645, use_sliding_window=False),
        vision_config=dict(depth=vdepth, embed_dim=96, hidden_size=hidden, hidden_act="quick_gelu", mlp_ratio=vmlp,
                           num_heads=vheads, in_channels=3, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
        vision_end_token_id=151653, tie_word_embeddings=True)


def write_tokenizer_files(out):
    # The shared tokenizer.json is pretty-printed (11.4 MB); the same JSON without the indentation is
    # 5.4 MB, and those 6 MB of the 25 MB budget buy a wider decoder (the embedding is vocab x hidden).
    with open(os.path.join(TOK_DIR, "tokenizer.json"), encoding="utf-8") as f:
        tj = json.load(f)
    with open(os.path.join(out, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tj, f, ensure_ascii=False, separators=(",", ":"))
    with open(os.path.join(TOK_DIR, "tokenizer_config.json")) as f:
        tc = json.load(f)
    tc["chat_template"] = QWEN2VL_TEMPLATE
    tc["model_max_length"] = 32768
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(tc, f, indent=2, ensure_ascii=False)
    with open(os.path.join(out, "chat_template.json"), "w") as f:
        json.dump({"chat_template": QWEN2VL_TEMPLATE}, f, indent=2)


class Proc:
    """Tokenizer + the slow (PIL) Qwen2-VL image processor + <|image_pad|> expansion.

    Qwen2VLProcessor cannot be built in this environment: transformers 5.24 insists on a video processor,
    which needs torchvision (not installed). So this does what the processor does for one image: render
    the chat template, expand the single <|image_pad|> to grid_t*grid_h*grid_w/merge^2 copies, tokenize."""

    def __init__(self, tok_dir, image_processor=None):
        self.tokenizer = Qwen2TokenizerFast.from_pretrained(tok_dir)
        self.image_processor = image_processor or Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS,
                                                                           max_pixels=MAX_PIXELS)

    def prompt(self, q, text_first):
        return self.tokenizer.apply_chat_template(dd.messages(q, text_first, {"type": "image"}),
                                                  add_generation_prompt=True, tokenize=False)

    def encode(self, samples, with_answer):
        texts, imgs = [], []
        for img, q, a, _k, tf in samples:
            t = self.prompt(q, tf)
            if with_answer:
                t = t + a + "<|im_end|>"
            texts.append(t)
            imgs.append(img)
        iv = self.image_processor(images=imgs, return_tensors="pt")
        merge = self.image_processor.merge_size ** 2
        for i, thw in enumerate(iv["image_grid_thw"]):
            assert texts[i].count("<|image_pad|>") == 1
            texts[i] = texts[i].replace("<|image_pad|>", "<|image_pad|>" * (int(thw.prod()) // merge))
        self.tokenizer.padding_side = "right" if with_answer else "left"
        enc = self.tokenizer(texts, return_tensors="pt", padding=True)
        enc["pixel_values"] = iv["pixel_values"]
        enc["image_grid_thw"] = iv["image_grid_thw"]
        # transformers 5.24 computes M-RoPE positions from this (0 text, 1 image), as its processor returns.
        enc["mm_token_type_ids"] = (enc["input_ids"] == IMAGE_TOKEN).long()
        return enc


def make_processor(tok_dir):
    return Proc(tok_dir)


def encode_batch(proc, samples, with_answer):
    return proc.encode(samples, with_answer)


AUX_GROUPS = (("local_color", 8), ("local_shape", 4), ("count", 3), ("circle_color", 8),
              ("square_color", 8), ("triangle_color", 8), ("single_shape", 4))
COLOR_NAMES = list(dd.COLORS)


def aux_labels(img, thw):
    """Dense training-only targets for every merged image token of one image (deep supervision).

    The vision tower otherwise learns only from the answer token, through a decoder that first has to
    learn where to look: the loss sits at the answer prior for thousands of steps. These targets teach
    the tower directly what the decoder will need: per token, the colour and shape of the object under
    it (0 = background); and, broadcast to every token, the number of shapes, the colour of each shape
    kind when it occurs exactly once (0 = absent or repeated) and the shape of a lone object. The head
    that reads them is a linear probe that is not part of the saved checkpoint."""
    from PIL import Image, ImageDraw
    objs = img.info["vlmd_objects"]
    t, h, w = (int(v) for v in thw)
    mh, mw = h // 2, w // 2
    lab = Image.new("L", img.size, 0)
    d = ImageDraw.Draw(lab)
    for i, (shape, _c, x, y, sz) in enumerate(objs):
        dd.draw_shape(d, shape, x, y, sz, i + 1)
    # Per token, the fraction of its area each object covers (box filter over the token's pixels); the
    # token is labelled with the object covering most of it when that is >= 10%. Edge tokens, the
    # ones that show the outline and so the shape, get labels too (a centre sample would miss them).
    import numpy as np
    full = np.asarray(lab)
    cov = [np.asarray(Image.fromarray(((full == i + 1) * 255).astype(np.uint8)).resize((mw, mh), Image.BOX),
                      dtype=np.float32).reshape(-1) / 255.0 for i in range(len(objs))]
    cov = np.stack(cov, 0)
    best = cov.argmax(0)
    has = cov.max(0) >= 0.10
    n = mh * mw
    lc = torch.zeros(n, dtype=torch.long)
    ls = torch.zeros(n, dtype=torch.long)
    for i, (shape, color, *_r) in enumerate(objs):
        m = torch.from_numpy(has & (best == i))
        lc[m] = COLOR_NAMES.index(color) + 1
        ls[m] = dd.SHAPES.index(shape) + 1
    names = [o[0] for o in objs]
    glob = [len(objs) - 1]
    for sh in dd.SHAPES:
        glob.append(COLOR_NAMES.index(objs[names.index(sh)][1]) + 1 if names.count(sh) == 1 else 0)
    glob.append(dd.SHAPES.index(objs[0][0]) + 1 if len(objs) == 1 else 0)
    cols = [lc, ls] + [torch.full((n,), g, dtype=torch.long) for g in glob]
    return torch.stack(cols, 1)


def train_sample(rng, kind):
    """A training sample; "colorm" is a colour question about a picture with 2 or 3 shapes. Those are the
    questions the model gets wrong last (it must find the named shape and read its colour; with one shape
    there is nothing to bind), so the later stages ask them more often than the uniform 1-3 shapes of
    the "color" kind (which is what the evaluations draw)."""
    if kind != "colorm":
        return dd.make_sample(rng, kind)
    while True:
        img, q, a, _k, tf = dd.make_sample(rng, "color")
        if len(img.info["vlmd_objects"]) > 1:
            return img, q, a, kind, tf


def train(args):
    torch.manual_seed(0)
    proc = make_processor(args.work_tok)
    im_end = proc.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assistant_ids = proc.tokenizer("<|im_start|>assistant\n")["input_ids"]
    model = Qwen2VLForConditionalGeneration(make_config(HIDDEN, LAYERS, FFN, VDEPTH, VMLP, VHEADS)).float()
    aux_head = torch.nn.Linear(model.config.text_config.hidden_size, sum(k for _n, k in AUX_GROUPS))
    merged = {}
    model.model.visual.merger.register_forward_hook(lambda _m, _i, o: merged.__setitem__("x", o))
    vis = [p for n, p in model.named_parameters() if ".visual." in n or n.startswith("visual.")]
    vis += list(aux_head.parameters())
    vis_ids = {id(p) for p in vis}
    emb = [model.get_input_embeddings().weight]
    rest = [p for p in model.parameters() if id(p) not in vis_ids and p is not emb[0]]
    # The tied 151680 x 32 embedding starts at std 0.02, so its logits start near 0 (loss ln 151680 = 11.9):
    # a larger step size there gets through that phase in tens of steps instead of hundreds.
    groups = [{"params": rest, "mult": 1.0}, {"params": vis, "mult": 1.0},
              {"params": emb, "mult": EMBED_LR_MULT, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=STAGES[0][4], weight_decay=WEIGHT_DECAY, betas=(0.9, 0.98))
    print("vision params %d, other %d" % (sum(p.numel() for p in vis), sum(p.numel() for p in rest)), flush=True)
    state_path = os.path.join(args.work, "state.pt")
    step0 = 0
    if os.path.exists(state_path):
        st = torch.load(state_path)
        model.load_state_dict(st["model"])
        aux_head.load_state_dict(st["aux"])
        opt.load_state_dict(st["opt"])
        step0 = st["step"]
        print("resumed at step", step0, flush=True)
    nparam = sum(p.numel() for p in model.parameters())
    print("parameters: %d (embedding %d)" % (nparam, model.get_input_embeddings().weight.numel()), flush=True)
    import random
    t0 = time.time()
    run_ok, run_n = {}, {}
    aux_ok = {"shape": 0, "n": 0}
    model.train()
    for step in range(step0, args.steps):
        rng = random.Random("%d/train/%d" % (dd.TRAIN_SEED, step))
        _first, mix, _p0, _p1, _peak, aux_weight = stage_at(step)
        mix = mix.split(",")
        samples = [train_sample(rng, mix[(step * BATCH + i) % len(mix)]) for i in range(BATCH)]
        enc = encode_batch(proc, samples, True)
        ids = enc["input_ids"]
        # Labels: the tokens after "<|im_start|>assistant\n" (answer word(s) + <|im_end|>).
        labels = torch.full_like(ids, -100)
        L = len(assistant_ids)
        for b in range(ids.shape[0]):
            row = ids[b].tolist()
            for j in range(len(row) - L, -1, -1):
                if row[j:j + L] == assistant_ids:
                    break
            k = j + L
            while k < len(row) and enc["attention_mask"][b, k]:
                labels[b, k] = row[k]
                if row[k] == im_end:
                    break
                k += 1
        lr = lr_at(step)
        for g in opt.param_groups:
            g["lr"] = lr * g["mult"]
        out = model.model(input_ids=ids, attention_mask=enc["attention_mask"], pixel_values=enc["pixel_values"],
                          image_grid_thw=enc["image_grid_thw"], mm_token_type_ids=enc["mm_token_type_ids"])
        h = out.last_hidden_state[:, :-1]
        tgt = labels[:, 1:]
        sel = tgt != -100
        logits = model.lm_head(h[sel])
        loss = torch.nn.functional.cross_entropy(logits, tgt[sel])
        aux_loss = torch.zeros(())
        if aux_weight > 0:
            y = torch.cat([aux_labels(smp[0], thw) for smp, thw in zip(samples, enc["image_grid_thw"])])
            z = aux_head(merged["x"])
            o = 0
            for gi, (name, k) in enumerate(AUX_GROUPS):
                aux_loss = aux_loss + torch.nn.functional.cross_entropy(z[:, o:o + k], y[:, gi])
                if name == "local_shape":
                    fg = y[:, gi] > 0
                    aux_ok["shape"] += (z[:, o:o + k].argmax(1)[fg] == y[fg, gi]).sum().item()
                    aux_ok["n"] += fg.sum().item()
                o += k
            aux_loss = aux_loss / len(AUX_GROUPS)
            loss = loss + aux_weight * aux_loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        # Running accuracy of each sample's first answer token, per question kind (the signal that matters:
        # the closing <|im_end|> is learnt in a few steps and would hide a model that ignores the image).
        with torch.no_grad():
            hit = (logits.argmax(-1) == tgt[sel]).tolist()
            first = torch.cumsum(sel.sum(1), 0) - sel.sum(1)
            for b, smp in enumerate(samples):
                run_ok[smp[3]] = run_ok.get(smp[3], 0) + hit[first[b]]
                run_n[smp[3]] = run_n.get(smp[3], 0) + 1
        if step % 25 == 0 or step == args.steps - 1:
            kacc = " ".join("%s %.2f" % (k, run_ok[k] / run_n[k]) for k in sorted(run_n))
            kacc += " | token-shape %.2f" % (aux_ok["shape"] / max(1, aux_ok["n"]))
            aux_ok.update(shape=0, n=0)
            print("step %d loss %.4f aux %.3f [%s] lr %.2e elapsed %.0fs" % (step, loss.item(), aux_loss.item(), kacc, lr,
                  time.time() - t0), flush=True)
            run_ok.clear()
            run_n.clear()
        if (step + 1) % args.save_every == 0 or step == args.steps - 1:
            torch.save({"model": model.state_dict(), "aux": aux_head.state_dict(), "opt": opt.state_dict(), "step": step + 1}, state_path + ".tmp")
            os.replace(state_path + ".tmp", state_path)
    print("training time this run: %.1f s" % (time.time() - t0), flush=True)
    return model, proc


def write_checkpoint(model, proc, out):
    os.makedirs(out, exist_ok=True)
    model = model.to(torch.bfloat16)
    model.config.torch_dtype = "bfloat16"
    model.save_pretrained(out, safe_serialization=True)
    proc.image_processor.save_pretrained(out)
    # transformers 5.24 writes only size{shortest_edge,longest_edge}; older readers (and released Qwen2-VL
    # checkpoints) use min_pixels/max_pixels, so write both spellings with the same values.
    pp = os.path.join(out, "preprocessor_config.json")
    with open(pp) as f:
        pc = json.load(f)
    pc["min_pixels"], pc["max_pixels"] = MIN_PIXELS, MAX_PIXELS
    with open(pp, "w") as f:
        json.dump(pc, f, indent=2)
    write_tokenizer_files(out)
    GenerationConfig(do_sample=False, temperature=None, top_p=None, top_k=None, bos_token_id=151643,
                     eos_token_id=[151645, 151643], pad_token_id=151643).save_pretrained(out)
    total = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    print("checkpoint %s: %.2f MB" % (out, total / 1e6), flush=True)


class Reference:
    """The checkpoint as transformers runs it (f32 compute from the stored bf16 weights, greedy)."""

    def __init__(self, ckpt):
        from transformers import AutoImageProcessor
        self.proc = Proc(ckpt, AutoImageProcessor.from_pretrained(ckpt, use_fast=False))
        self.model = Qwen2VLForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()

    def answer(self, img, q, text_first):
        inputs = self.proc.encode([(img, q, None, None, text_first)], False)
        with torch.no_grad():
            g = self.model.generate(**inputs, max_new_tokens=5, do_sample=False)
        return self.proc.tokenizer.decode(g[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def evaluate(ckpt, n, seed, threads):
    """Greedy generate with transformers on n fresh images per kind; returns {kind: accuracy}."""
    torch.set_num_threads(threads)
    ref = Reference(ckpt)
    print("eval image processor:", type(ref.proc.image_processor).__name__, flush=True)
    res = {}
    t0 = time.time()
    for kind in dd.KINDS:
        ok, bad = 0, []
        for img, q, a, _k, tf in dd.sample_stream(seed, kind, n):
            txt = ref.answer(img, q, tf)
            ok += txt == a
            if txt != a and len(bad) < 5:
                bad.append((q, a, txt))
        res[kind] = ok / n
        print("eval %s: %d/%d = %.4f  (first errors: %s)" % (kind, ok, n, ok / n, bad), flush=True)
    print("eval time %.1f s" % (time.time() - t0), flush=True)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(ROOT, "configs/models/vlmd-demo"))
    ap.add_argument("--work", default=os.path.join(ROOT, "build/demo-train"))
    ap.add_argument("--steps", type=int, default=STEPS, help="stop after this step (the recipe has %d)" % STEPS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save-every", type=int, default=100)
    ap.add_argument("--eval-n", type=int, default=300)
    ap.add_argument("--eval-only", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.work, exist_ok=True)
    args.work_tok = os.path.join(args.work, "tok")
    os.makedirs(args.work_tok, exist_ok=True)
    write_tokenizer_files(args.work_tok)
    if not args.eval_only:
        model, proc = train(args)
        write_checkpoint(model, proc, args.out)
    if args.eval_n > 0:
        res = evaluate(args.out, args.eval_n, dd.EVAL_SEED, args.threads)
        print("ACCURACY", json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
