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
MIN_PIXELS = 56 * 56       # SPEC default
IMAGE_TOKEN = 151655       # <|image_pad|>

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


def make_config():
    return Qwen2VLConfig(
        text_config=dict(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=2, num_key_value_heads=2, head_dim=16, hidden_act="silu",
            max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
            bos_token_id=151643, eos_token_id=151645, use_sliding_window=False),
        vision_config=dict(depth=3, embed_dim=96, hidden_size=32, hidden_act="quick_gelu", mlp_ratio=2,
                           num_heads=3, in_channels=3, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
        vision_end_token_id=151653, tie_word_embeddings=True)


def write_tokenizer_files(out):
    shutil.copyfile(os.path.join(TOK_DIR, "tokenizer.json"), os.path.join(out, "tokenizer.json"))
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


def train(args):
    torch.manual_seed(0)
    proc = make_processor(args.work_tok)
    im_end = proc.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assistant_ids = proc.tokenizer("<|im_start|>assistant\n")["input_ids"]
    model = Qwen2VLForConditionalGeneration(make_config()).float()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.98))
    state_path = os.path.join(args.work, "state.pt")
    step0 = 0
    if os.path.exists(state_path):
        st = torch.load(state_path)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        step0 = st["step"]
        print("resumed at step", step0, flush=True)
    nparam = sum(p.numel() for p in model.parameters())
    print("parameters: %d (embedding %d)" % (nparam, model.get_input_embeddings().weight.numel()), flush=True)
    import random
    t0 = time.time()
    model.train()
    for step in range(step0, args.steps):
        rng = random.Random("%d/train/%d" % (dd.TRAIN_SEED, step))
        samples = [dd.make_sample(rng, dd.KINDS[(step * args.batch + i) % 3]) for i in range(args.batch)]
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
        lr = args.lr * min(1.0, (step + 1) / 100) * (0.5 * (1 + math.cos(math.pi * step / args.steps)) * 0.95 + 0.05)
        for g in opt.param_groups:
            g["lr"] = lr
        out = model.model(input_ids=ids, attention_mask=enc["attention_mask"], pixel_values=enc["pixel_values"],
                          image_grid_thw=enc["image_grid_thw"], mm_token_type_ids=enc["mm_token_type_ids"])
        h = out.last_hidden_state[:, :-1]
        tgt = labels[:, 1:]
        sel = tgt != -100
        logits = model.lm_head(h[sel])
        loss = torch.nn.functional.cross_entropy(logits, tgt[sel])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == args.steps - 1:
            acc = (logits.argmax(-1) == tgt[sel]).float().mean().item()
            print("step %d loss %.4f tokacc %.3f lr %.2e elapsed %.0fs" % (step, loss.item(), acc, lr,
                  time.time() - t0), flush=True)
        if (step + 1) % args.save_every == 0 or step == args.steps - 1:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step + 1}, state_path + ".tmp")
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
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--lr", type=float, default=3e-3)
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
