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
  tiny-decoder/ a tiny NVLM-D checkpoint holding only the language model (config.json with llm_config +
                vision_config, `language_model.model.*` / `language_model.lm_head.weight` names, two shards
                with an index, bf16 matrices next to f32 norms/biases: dtypes come from the headers), and
                decoder.json + decoder_*.npy: transformers Qwen2ForCausalLM (eager, f32, weights rounded
                through bf16 as stored) first-step logits and greedy continuations for a text prompt and for
                a prompt whose <|vision_pad|> rows are replaced by given embeddings (as NVLM_D_Model does via
                inputs_embeds), with position_ids 0..L-1 — the 1-D RoPE path vlmd shares with Qwen2.
  tiny-nvlm/    a tiny full NVLM-D checkpoint (InternViT E=64, 4 heads + NVLM's 7 zero dummy heads, 2 layers,
                448 tiles / 14 px patches so a tile is still 1025 tokens -> 256 image tokens; Qwen2 text
                hidden 64 with intermediate 64), built from transformers InternVLForConditionalGeneration
                (InternViT-style vision config: rms_norm, use_qk_norm, layer scale; Qwen2 text config) by
                mapping the keys, and vision.json + vision_*.npy: that model's image features
                (get_image_features) for a 3-tile image, and its logits / greedy tokens for a prompt with them.
                Differences transformers cannot express, and how they are bridged: NVLM's mlp1 has no biases
                and its middle width is the LLM intermediate_size (transformers: text hidden_size, biased) ->
                biases zeroed and intermediate_size == hidden_size in the tiny model; NVLM pads the attention
                to 25 + 7 heads (qkv / q_norm / k_norm / proj carry dummy channels, QK-norm variance over the
                real channels only) -> written with zero dummy q/k/v rows and random q_norm / proj dummy
                entries, which must not change the result; ps_version v1 (transposed) does not exist in
                transformers (its pixel_shuffle is v2) -> tested against a hand-worked permutation in
                tests/unit/test_nvlm.c. transformers' vision tower ends in a LayerNorm unless
                use_mean_pooling is set: set, so it is the identity as in NVLM.
  served.json   (--served) the NVLM-D server tests' reference: tools/make_model.py's tiny-nvlm test model
                (NVLM-D layout, Qwen tokenizer, ChatML template) rebuilt through make_model.nvlm_tensors,
                loaded into transformers InternVLForConditionalGeneration (dummy heads dropped, mlp1 ->
                projector with zero biases), and per chat case (text, one 4-tile image, two images): the
                prompt as vLLM builds NVLM-D prompts (one "<image>\n" per image before the text, the tokenizer's
                chat template, then chat()'s tile-tag substitution), its token ids, and 16 greedy tokens
                (full recompute each step, f32, eager) with the smallest top-1/top-2 logit gap seen.
  kOrder        (printed with --print-order) the candidate order table in vision/nvlm_preprocess.c.

The synthetic image is a formula both this script and tests/unit/test_nvlm.c compute:
  rgb[y][x][c] = (7x + 13y + 50c + 3((x*y) mod 31)) mod 256
Usage: nice -n 15 python3 tools/make_nvlm.py --out tests/fixtures/nvlm
       nice -n 15 python3 tools/make_nvlm.py --served [--models-dir build/models]   (served.json only)
       nice -n 15 python3 tools/make_nvlm.py --bench-model build/models/nvlm-bench   (numpy only: a
       scaled-down InternViT — hidden 640, 5 heads + 7 dummy, 4 layers, MLP 2560, 448 tiles — with a
       2-layer hidden-512 Qwen2 decoder, bf16, random weights, for bench/nvlm.c)
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


DEC = dict(hidden=64, heads=4, kv=2, inter=128, layers=2, vocab=320, pad=300, eos=301)


def bf16_round(a):
    b = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint32)  # round to nearest even
    return (b << 16).view(np.float32)


def write_st(path, tensors):
    header, off, blobs = {}, 0, []
    for name, (arr, dt) in tensors.items():
        if dt == "BF16":
            raw = (np.ascontiguousarray(bf16_round(arr)).view(np.uint32) >> 16).astype("<u2").tobytes()
        else:
            raw = np.ascontiguousarray(arr, dtype="<f4").tobytes()
        header[name] = {"dtype": dt, "shape": list(arr.shape), "data_offsets": [off, off + len(raw)]}
        off += len(raw)
        blobs.append(raw)
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * ((8 - len(hb) % 8) % 8)
    with open(path, "wb") as f:
        f.write(len(hb).to_bytes(8, "little"))
        f.write(hb)
        for b in blobs:
            f.write(b)


def make_decoder(out):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    d = DEC
    rng = np.random.default_rng(55)
    H, F, hd = d["hidden"], d["inter"], d["hidden"] // d["heads"]
    q, kv = d["heads"] * hd, d["kv"] * hd
    sd = {"model.embed_tokens.weight": (rng.standard_normal((d["vocab"], H)) * 0.5, "BF16"),
          "model.norm.weight": (1 + 0.1 * rng.standard_normal(H), "F32"),
          "lm_head.weight": (rng.standard_normal((d["vocab"], H)) * 0.2, "BF16")}
    for l in range(d["layers"]):
        p = f"model.layers.{l}."
        for n, shp, dt in [("input_layernorm.weight", (H,), "F32"), ("post_attention_layernorm.weight", (H,), "F32"),
                           ("self_attn.q_proj.weight", (q, H), "BF16"), ("self_attn.k_proj.weight", (kv, H), "BF16"),
                           ("self_attn.v_proj.weight", (kv, H), "BF16"), ("self_attn.q_proj.bias", (q,), "F32"),
                           ("self_attn.k_proj.bias", (kv,), "F32"), ("self_attn.v_proj.bias", (kv,), "F32"),
                           ("self_attn.o_proj.weight", (H, q), "BF16"), ("mlp.gate_proj.weight", (F, H), "BF16"),
                           ("mlp.up_proj.weight", (F, H), "BF16"), ("mlp.down_proj.weight", (H, F), "BF16")]:
            scale = 0.1 if "norm" in n else (0.05 if "bias" in n else 1 / np.sqrt(shp[-1]))
            base = 1.0 if "norm" in n else 0.0
            sd[p + n] = (base + scale * rng.standard_normal(shp), dt)
    sd = {k: (np.asarray(v, dtype=np.float32), dt) for k, (v, dt) in sd.items()}
    os.makedirs(os.path.join(out, "tiny-decoder"), exist_ok=True)
    names = list(sd)
    shards = [names[: len(names) // 2], names[len(names) // 2:]]
    wmap = {}
    for i, part in enumerate(shards):
        fn = f"model-{i + 1:05d}-of-00002.safetensors"
        write_st(os.path.join(out, "tiny-decoder", fn), {"language_model." + k: sd[k] for k in part})
        wmap.update({"language_model." + k: fn for k in part})
    with open(os.path.join(out, "tiny-decoder", "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": wmap}, f, indent=1)
    cfg = json.load(open(os.path.join(out, "nvlm-d-72b", "config.json")))
    llm = cfg["llm_config"]
    llm.update(hidden_size=H, intermediate_size=F, num_attention_heads=d["heads"], num_key_value_heads=d["kv"],
               num_hidden_layers=d["layers"], vocab_size=d["vocab"], eos_token_id=d["eos"], bos_token_id=d["eos"])
    cfg["image_token_id"] = d["pad"]  # the tiny vocabulary has no <|vision_pad|> at 151654
    cfg["vision_config"].update(hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=2)
    with open(os.path.join(out, "tiny-decoder", "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)

    qc = Qwen2Config(hidden_size=H, intermediate_size=F, num_attention_heads=d["heads"],
                     num_key_value_heads=d["kv"], num_hidden_layers=d["layers"], vocab_size=d["vocab"],
                     rms_norm_eps=llm["rms_norm_eps"], rope_theta=llm["rope_theta"],
                     max_position_embeddings=llm["max_position_embeddings"], tie_word_embeddings=False)
    qc._attn_implementation = "eager"
    model = Qwen2ForCausalLM(qc).eval()
    state = {k: torch.from_numpy(bf16_round(v) if dt == "BF16" else v) for k, (v, dt) in sd.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    prompts = {"text": [5, 17, 99, 3, 250, 42, 7]}
    n_img = 6
    img_ids = [5, 17] + [d["pad"]] * n_img + [88, 9]
    embeds = (rng.standard_normal((n_img, H)) * 0.5).astype(np.float32)
    np.save(os.path.join(out, "decoder_image_embeds.npy"), embeds)
    prompts["image"] = img_ids
    res = {"made_by": "tools/make_nvlm.py", "cases": {}}
    for name, ids in prompts.items():
        emb_layer = model.get_input_embeddings()
        with torch.no_grad():
            x = emb_layer(torch.tensor([ids]))
            if name == "image":
                x[0, torch.tensor(ids) == d["pad"]] = torch.from_numpy(embeds)
            logits = model(inputs_embeds=x, position_ids=torch.arange(len(ids))[None]).logits[0, -1].numpy()
            np.save(os.path.join(out, f"decoder_{name}_logits.npy"), logits.astype(np.float32))
            # greedy continuation, recomputing the whole sequence each step (no cache subtleties)
            seq_emb, gen = x, []
            for _ in range(8):
                lg = model(inputs_embeds=seq_emb, position_ids=torch.arange(seq_emb.shape[1])[None]).logits[0, -1]
                t = int(lg.argmax())
                gen.append(t)
                seq_emb = torch.cat([seq_emb, emb_layer(torch.tensor([[t]]))], dim=1)
        res["cases"][name] = {"ids": ids, "greedy": gen}
    with open(os.path.join(out, "decoder.json"), "w") as f:
        json.dump(res, f, indent=1)


def make_tiny_nvlm(out):
    import torch
    from transformers import (InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig,
                              Qwen2Config)
    E, HEADS, D, DUMMY, VF, VL = 64, 4, 16, 7, 128, 2
    H, PAD = 64, 300
    vc = InternVLVisionConfig(hidden_size=E, num_attention_heads=HEADS, intermediate_size=VF,
                              num_hidden_layers=VL, norm_type="rms_norm", use_qk_norm=True,
                              image_size=[TILE, TILE], patch_size=[14, 14], attention_bias=False,
                              use_mean_pooling=True, use_absolute_position_embeddings=True,
                              layer_norm_eps=1e-6, hidden_act="gelu")
    tc = Qwen2Config(hidden_size=H, intermediate_size=H, num_attention_heads=4, num_key_value_heads=2,
                     num_hidden_layers=2, vocab_size=320, rms_norm_eps=1e-6, rope_theta=1e6,
                     max_position_embeddings=32768, tie_word_embeddings=False)
    cfg = InternVLConfig(vision_config=vc, text_config=tc, image_token_id=PAD, downsample_ratio=0.5,
                         vision_feature_layer=-1, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu")
    cfg._attn_implementation = "eager"
    cfg.vision_config._attn_implementation = "eager"
    cfg.text_config._attn_implementation = "eager"
    torch.manual_seed(5)
    model = InternVLForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if "rotary" in k or "inv_freq" in k:
                continue
            if k.endswith("norm.weight") or "layernorm" in k and k.endswith("weight") or "layer_norm.weight" in k:
                v.copy_(1 + 0.1 * torch.randn_like(v))
            elif "lambda" in k:
                v.copy_(0.5 + 0.2 * torch.randn_like(v))
            elif "multi_modal_projector.linear" in k and k.endswith("bias"):
                v.zero_()  # NVLM's mlp1 Linear layers have no bias
            elif k.endswith("bias"):
                v.copy_(0.05 * torch.randn_like(v))
            elif v.dim() >= 2:
                v.copy_(torch.randn_like(v) / np.sqrt(v[0].numel()))
            else:
                v.copy_(0.5 * torch.randn_like(v))
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    rng = np.random.default_rng(9)
    nv = {}
    vt = "model.vision_tower."
    nv["vision_model.embeddings.class_embedding"] = sd[vt + "embeddings.cls_token"].reshape(1, 1, E)
    nv["vision_model.embeddings.position_embedding"] = sd[vt + "embeddings.position_embeddings"].reshape(1, -1, E)
    nv["vision_model.embeddings.patch_embedding.weight"] = sd[vt + "embeddings.patch_embeddings.projection.weight"]
    nv["vision_model.embeddings.patch_embedding.bias"] = sd[vt + "embeddings.patch_embeddings.projection.bias"]
    QD = (HEADS + DUMMY) * D
    for l in range(VL):
        s_, d_ = f"{vt}encoder.layer.{l}.", f"vision_model.encoder.layers.{l}."
        nv[d_ + "norm1.weight"] = sd[s_ + "layernorm_before.weight"]
        nv[d_ + "norm2.weight"] = sd[s_ + "layernorm_after.weight"]
        nv[d_ + "ls1"] = sd[s_ + "lambda_1"]
        nv[d_ + "ls2"] = sd[s_ + "lambda_2"]
        qkv = np.zeros((3 * QD, E), np.float32)
        for i, n in enumerate(("q_proj", "k_proj", "v_proj")):
            qkv[i * QD: i * QD + E] = sd[s_ + f"attention.{n}.weight"]  # dummy-head rows stay zero
        nv[d_ + "attn.qkv.weight"] = qkv
        for n in ("q_norm", "k_norm"):
            w = rng.standard_normal(QD).astype(np.float32)  # dummy entries: arbitrary, must not matter
            w[:E] = sd[s_ + f"attention.{n}.weight"]
            nv[d_ + f"attn.{n}.weight"] = w
        pw = rng.standard_normal((E, QD)).astype(np.float32)
        pw[:, :E] = sd[s_ + "attention.projection_layer.weight"]
        nv[d_ + "attn.proj.weight"] = pw
        nv[d_ + "attn.proj.bias"] = sd[s_ + "attention.projection_layer.bias"]
        for n in ("fc1", "fc2"):
            nv[d_ + f"mlp.{n}.weight"] = sd[s_ + f"mlp.{n}.weight"]
            nv[d_ + f"mlp.{n}.bias"] = sd[s_ + f"mlp.{n}.bias"]
    pj = "model.multi_modal_projector."
    nv["mlp1.0.weight"], nv["mlp1.0.bias"] = sd[pj + "layer_norm.weight"], sd[pj + "layer_norm.bias"]
    nv["mlp1.1.weight"], nv["mlp1.3.weight"] = sd[pj + "linear_1.weight"], sd[pj + "linear_2.weight"]
    for k, v in sd.items():
        if k.startswith("model.language_model."):
            nv["language_model.model." + k[len("model.language_model."):]] = v
    nv["language_model.lm_head.weight"] = sd["lm_head.weight"]
    d = os.path.join(out, "tiny-nvlm")
    os.makedirs(d, exist_ok=True)
    write_st(os.path.join(d, "model.safetensors"), {k: (v, "F32") for k, v in nv.items()})
    c = json.load(open(os.path.join(out, "nvlm-d-72b", "config.json")))
    c["llm_config"].update(hidden_size=H, intermediate_size=H, num_attention_heads=4, num_key_value_heads=2,
                           num_hidden_layers=2, vocab_size=320, eos_token_id=301, bos_token_id=301,
                           torch_dtype="float32")
    c["torch_dtype"] = "float32"
    c["image_token_id"] = PAD
    c["vision_config"].update(hidden_size=E, num_attention_heads=HEADS, intermediate_size=VF, num_hidden_layers=VL)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(c, f, indent=1)
    # a 3-tile image (2x1 grid + thumbnail) through the NVLM preprocessing, then transformers
    img = synth_image(900, 448)
    _, tiles = tiles_of(img, 6)
    pv = torch.from_numpy(np.stack([to_pixel_values(t) for t in tiles]))
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=pv, vision_feature_layer=-1,
                                               vision_feature_select_strategy="default")
        feats = getattr(feats, "pooler_output", feats)
        feats = feats.reshape(-1, H)
    np.save(os.path.join(out, "vision_embeds_900x448.npy"), feats.numpy().astype(np.float32))
    ids = [5, 17] + [PAD] * feats.shape[0] + [88, 9]
    with torch.no_grad():
        x = model.get_input_embeddings()(torch.tensor([ids]))
        x[0, torch.tensor(ids) == PAD] = feats
        lm = model.model.language_model
        def logits_of(e):
            hs = lm(inputs_embeds=e, position_ids=torch.arange(e.shape[1])[None]).last_hidden_state
            return model.lm_head(hs)[0, -1]
        lg = logits_of(x)
        np.save(os.path.join(out, "vision_logits_900x448.npy"), lg.numpy().astype(np.float32))
        gen, e = [], x
        for _ in range(8):
            t = int(logits_of(e).argmax())
            gen.append(t)
            e = torch.cat([e, model.get_input_embeddings()(torch.tensor([[t]]))], dim=1)
    with open(os.path.join(out, "vision.json"), "w") as f:
        json.dump({"made_by": "tools/make_nvlm.py", "image": [900, 448], "n_tiles": len(tiles),
                   "ids": ids, "greedy": gen}, f, indent=1)


def make_bench_model(d):
    rng = np.random.default_rng(1)
    E, HEADS, DUMMY, VF, VL, H, F, V = 640, 5, 7, 2560, 4, 512, 1536, 4096
    D = E // HEADS
    QD = (HEADS + DUMMY) * D
    t = {}
    def w(name, *shape, scale=None, base=0.0, dt="BF16"):
        sc = scale if scale is not None else 1 / np.sqrt(shape[-1])
        t[name] = ((base + sc * rng.standard_normal(shape)).astype(np.float32), dt)
    w("vision_model.embeddings.class_embedding", 1, 1, E, scale=0.5, dt="F32")
    w("vision_model.embeddings.position_embedding", 1, 1025, E, scale=0.5, dt="F32")
    w("vision_model.embeddings.patch_embedding.weight", E, 3, 14, 14)
    w("vision_model.embeddings.patch_embedding.bias", E, scale=0.05, dt="F32")
    for l in range(VL):
        p = f"vision_model.encoder.layers.{l}."
        for n in ("norm1.weight", "norm2.weight"):
            w(p + n, E, scale=0.1, base=1.0, dt="F32")
        for n in ("ls1", "ls2"):
            w(p + n, E, scale=0.1, base=0.5, dt="F32")
        w(p + "attn.qkv.weight", 3 * QD, E)
        for n in ("attn.q_norm.weight", "attn.k_norm.weight"):
            w(p + n, QD, scale=0.1, base=1.0, dt="F32")
        w(p + "attn.proj.weight", E, QD)
        w(p + "attn.proj.bias", E, scale=0.05, dt="F32")
        w(p + "mlp.fc1.weight", VF, E)
        w(p + "mlp.fc1.bias", VF, scale=0.05, dt="F32")
        w(p + "mlp.fc2.weight", E, VF)
        w(p + "mlp.fc2.bias", E, scale=0.05, dt="F32")
    w("mlp1.0.weight", 4 * E, scale=0.1, base=1.0, dt="F32")
    w("mlp1.0.bias", 4 * E, scale=0.05, dt="F32")
    w("mlp1.1.weight", F, 4 * E)
    w("mlp1.3.weight", H, F)
    lm = "language_model.model."
    w(lm + "embed_tokens.weight", V, H, scale=0.5)
    w(lm + "norm.weight", H, scale=0.1, base=1.0, dt="F32")
    w("language_model.lm_head.weight", V, H)
    for l in range(2):
        p = f"{lm}layers.{l}."
        w(p + "input_layernorm.weight", H, scale=0.1, base=1.0, dt="F32")
        w(p + "post_attention_layernorm.weight", H, scale=0.1, base=1.0, dt="F32")
        for n, o in (("q", H), ("k", 128), ("v", 128)):
            w(p + f"self_attn.{n}_proj.weight", o, H)
            w(p + f"self_attn.{n}_proj.bias", o, scale=0.05, dt="F32")
        w(p + "self_attn.o_proj.weight", H, H)
        w(p + "mlp.gate_proj.weight", F, H)
        w(p + "mlp.up_proj.weight", F, H)
        w(p + "mlp.down_proj.weight", H, F)
    os.makedirs(d, exist_ok=True)
    write_st(os.path.join(d, "model.safetensors"), t)
    here = os.path.dirname(os.path.abspath(__file__))
    c = json.load(open(os.path.join(here, "..", "tests", "fixtures", "nvlm", "nvlm-d-72b", "config.json")))
    c["llm_config"].update(hidden_size=H, intermediate_size=F, num_attention_heads=4, num_key_value_heads=1,
                           num_hidden_layers=2, vocab_size=V, eos_token_id=V - 1, bos_token_id=V - 1)
    c["image_token_id"] = V - 2
    c["vision_config"].update(hidden_size=E, num_attention_heads=HEADS, intermediate_size=VF, num_hidden_layers=VL)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(c, f, indent=1)


SERVED_CASES = {
    "text": [{"role": "user", "content": "Hello, who are you?"}],
    "image": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "tests/data/images/wide_200x60.png"}},
        {"type": "text", "text": "Describe this image."}]}],
    "two_images": [
        {"role": "system", "content": "You are a careful observer."},
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "tests/data/images/grad_224.png"}},
            {"type": "image_url", "image_url": {"url": "tests/data/images/wide_200x60.png"}},
            {"type": "text", "text": "What differs between these images?"}]}],
}
SERVED_GREEDY = 16


def nvlm_flat_messages(messages):
    """String-content messages as vLLM builds them for NVLM-D: '<image>\n' per image, then the text parts
    joined with '\n'. Returns (messages, image paths in order)."""
    out, paths = [], []
    for m in messages:
        if isinstance(m["content"], str):
            out.append({"role": m["role"], "content": m["content"]})
            continue
        imgs = [p["image_url"]["url"] for p in m["content"] if p["type"] == "image_url"]
        texts = [p["text"] for p in m["content"] if p["type"] == "text"]
        paths += imgs
        out.append({"role": m["role"], "content": "".join("<image>\n" for _ in imgs) + "\n".join(texts)})
    return out, paths


def make_served(models_dir, out):
    import torch
    from PIL import Image
    from transformers import (InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig,
                              PreTrainedTokenizerFast, Qwen2Config)
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    sys.path.insert(0, here)
    import make_model
    name = "tiny-nvlm"
    spec = make_model.resolve_spec(name)
    mdir = os.path.join(models_dir, name)
    make_model.write_model(name, mdir)
    W = make_model.nvlm_tensors(spec)
    t, v = spec["text"], spec["nvlm_vision"]
    E, HEADS, D = v["hidden"], v["heads"], v["hidden"] // v["heads"]
    QD = v["padded_heads"] * D
    H = t["hidden"]
    vc = InternVLVisionConfig(hidden_size=E, num_attention_heads=HEADS, intermediate_size=v["ffn"],
                              num_hidden_layers=v["layers"], norm_type="rms_norm", use_qk_norm=True,
                              image_size=[v["image"]] * 2, patch_size=[v["patch"]] * 2, attention_bias=False,
                              use_mean_pooling=True, use_absolute_position_embeddings=True,
                              layer_norm_eps=1e-6, hidden_act="gelu")
    tc = Qwen2Config(hidden_size=H, intermediate_size=t["ffn"], num_attention_heads=t["heads"],
                     num_key_value_heads=t["kv_heads"], num_hidden_layers=t["layers"], vocab_size=t["vocab"],
                     rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=32768,
                     tie_word_embeddings=spec["tied"])
    ctx_id = 151654  # <|vision_pad|> in the Qwen2 vocabulary
    cfg = InternVLConfig(vision_config=vc, text_config=tc, image_token_id=ctx_id, downsample_ratio=0.5,
                         vision_feature_layer=-1, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu", tie_word_embeddings=spec["tied"])  # default: tied
    for c in (cfg, cfg.vision_config, cfg.text_config):
        c._attn_implementation = "eager"
    model = InternVLForConditionalGeneration(cfg).eval()
    vt = "model.vision_tower."
    sd = {vt + "embeddings.cls_token": W["vision_model.embeddings.class_embedding"],
          vt + "embeddings.position_embeddings": W["vision_model.embeddings.position_embedding"],
          vt + "embeddings.patch_embeddings.projection.weight": W["vision_model.embeddings.patch_embedding.weight"],
          vt + "embeddings.patch_embeddings.projection.bias": W["vision_model.embeddings.patch_embedding.bias"]}
    for l in range(v["layers"]):
        s_, d_ = f"vision_model.encoder.layers.{l}.", f"{vt}encoder.layer.{l}."
        sd[d_ + "layernorm_before.weight"] = W[s_ + "norm1.weight"]
        sd[d_ + "layernorm_after.weight"] = W[s_ + "norm2.weight"]
        sd[d_ + "lambda_1"] = W[s_ + "ls1"]
        sd[d_ + "lambda_2"] = W[s_ + "ls2"]
        qkv = W[s_ + "attn.qkv.weight"]
        assert not qkv[QD * 0 + E:QD].any() and not qkv[2 * QD + E:].any()  # dummy heads are zero
        for i, n in enumerate(("q_proj", "k_proj", "v_proj")):
            sd[d_ + f"attention.{n}.weight"] = qkv[i * QD:i * QD + E]
        sd[d_ + "attention.q_norm.weight"] = W[s_ + "attn.q_norm.weight"][:E]
        sd[d_ + "attention.k_norm.weight"] = W[s_ + "attn.k_norm.weight"][:E]
        sd[d_ + "attention.projection_layer.weight"] = W[s_ + "attn.proj.weight"][:, :E]
        sd[d_ + "attention.projection_layer.bias"] = W[s_ + "attn.proj.bias"]
        for n in ("fc1", "fc2"):
            sd[d_ + f"mlp.{n}.weight"] = W[s_ + f"mlp.{n}.weight"]
            sd[d_ + f"mlp.{n}.bias"] = W[s_ + f"mlp.{n}.bias"]
    pj = "model.multi_modal_projector."
    sd[pj + "layer_norm.weight"], sd[pj + "layer_norm.bias"] = W["mlp1.0.weight"], W["mlp1.0.bias"]
    sd[pj + "linear_1.weight"], sd[pj + "linear_2.weight"] = W["mlp1.1.weight"], W["mlp1.3.weight"]
    sd[pj + "linear_1.bias"] = np.zeros(W["mlp1.1.weight"].shape[0], np.float32)  # NVLM's mlp1: no biases
    sd[pj + "linear_2.bias"] = np.zeros(W["mlp1.3.weight"].shape[0], np.float32)
    for k, a in W.items():
        if k.startswith("language_model.model."):
            sd["model.language_model." + k[len("language_model.model."):]] = a
    sd["lm_head.weight"] = W["language_model.lm_head.weight"] if not spec["tied"] else \
        W["language_model.model.embed_tokens.weight"]
    state = {k: torch.from_numpy(np.ascontiguousarray(a)) for k, a in sd.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m or "inv_freq" in m for m in missing), (missing, unexpected)
    tok = PreTrainedTokenizerFast.from_pretrained(mdir)
    assert tok.convert_tokens_to_ids("<|vision_pad|>") == ctx_id
    res = {"made_by": "tools/make_nvlm.py --served", "model": name, "greedy_steps": SERVED_GREEDY, "cases": {}}
    emb = model.get_input_embeddings()
    for cname, messages in SERVED_CASES.items():
        flat, paths = nvlm_flat_messages(messages)
        query = tok.apply_chat_template(flat, tokenize=False, add_generation_prompt=True)
        feats, n_tiles = [], []
        for pth in paths:
            img = Image.open(os.path.join(root, pth)).convert("RGB")  # load_image of the model card
            _, tiles = tiles_of(img, 6)
            n_tiles.append(len(tiles))
            pv = torch.from_numpy(np.stack([to_pixel_values(x) for x in tiles]))
            with torch.no_grad():
                f = model.model.get_image_features(pixel_values=pv, vision_feature_layer=-1,
                                                   vision_feature_select_strategy="default")
            feats.append(getattr(f, "pooler_output", f).reshape(-1, H))
            tags = [f"<tile_{i}>" for i in range(1, len(tiles))] + ["<tile_global_thumbnail>"]
            query = query.replace("<image>", "<Image>" + "".join(tg + "<|vision_pad|>" * 256 for tg in tags) +
                                  "</Image>", 1)
        ids = tok(query)["input_ids"]
        with torch.no_grad():
            x = emb(torch.tensor([ids]))
            if feats:
                x[0, torch.tensor(ids) == ctx_id] = torch.cat(feats)
            gen, gaps, e = [], [], x
            for _ in range(SERVED_GREEDY):
                hs = model.model.language_model(inputs_embeds=e,
                                                position_ids=torch.arange(e.shape[1])[None]).last_hidden_state
                lg = model.lm_head(hs)[0, -1]
                top = torch.topk(lg, 2).values
                gaps.append(float(top[0] - top[1]))
                tkn = int(lg.argmax())
                gen.append(tkn)
                e = torch.cat([e, emb(torch.tensor([[tkn]]))], dim=1)
        res["cases"][cname] = {"messages": messages, "n_tiles": n_tiles, "prompt_ids": ids,
                               "n_prompt": len(ids), "greedy_ids": gen, "min_top2_gap": min(gaps)}
        print(f"{cname}: {len(ids)} prompt tokens, tiles {n_tiles}, min top-2 gap {min(gaps):.4f}", file=sys.stderr)
    with open(os.path.join(out, "served.json"), "w") as f:
        json.dump(res, f, separators=(",", ":"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="tests/fixtures/nvlm")
    ap.add_argument("--print-order", action="store_true")
    ap.add_argument("--bench-model", metavar="DIR", help="write only the scaled-down bench model to DIR")
    ap.add_argument("--served", action="store_true", help="write only served.json (server tests' reference)")
    ap.add_argument("--models-dir", default="build/models", help="where make_model.py's tiny-nvlm goes")
    args = ap.parse_args()
    if args.served:
        make_served(args.models_dir, args.out)
        return
    if args.bench_model:
        make_bench_model(args.bench_model)
        return
    if args.print_order:
        digits = "0123456789abc"
        for m in range(1, 13):
            print('    "' + "".join(digits[i] + digits[j] for i, j in candidate_grids(1, m)) + '",')
        return
    os.makedirs(args.out, exist_ok=True)
    make_decoder(args.out)
    make_tiny_nvlm(args.out)
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
