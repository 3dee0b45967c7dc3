/* test_safetensors.c — checkpoint opening and validation (SPEC §A.1–A.2) and model loading errors.
 * Good and bad files are written by the test itself into a temporary directory; every bad input must
 * return the right status with a message naming the file or tensor, and never crash (also run under ASan). */
#include "runtime/runtime.h"
#include "tests/unit/test.h"

#include <stdint.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

static char tmpdir[256];

/* Writes a safetensors file: header JSON text as given (not padded), then data_len bytes of data. */
static void write_st(const char *path, const char *hdr, size_t data_len) {
    FILE *f = fopen(path, "wb");
    uint64_t n = strlen(hdr);
    unsigned char le[8];
    for (int i = 0; i < 8; i++) le[i] = (unsigned char)(n >> (8 * i));
    fwrite(le, 1, 8, f);
    fwrite(hdr, 1, n, f);
    for (size_t i = 0; i < data_len; i++) fputc((int)(i & 0xff), f);
    fclose(f);
}

static char *tpath(const char *name) {
    static char p[4][512];
    static int k;
    k = (k + 1) % 4;
    snprintf(p[k], sizeof p[k], "%s/%s", tmpdir, name);
    return p[k];
}

static vlm_status try_open(const char *path, char *err, size_t n) {
    vlm_ckpt *c = NULL;
    err[0] = 0;
    vlm_status st = vlm_ckpt_open(path, &c, err, n);
    if (st == VLM_OK) CHECK(c != NULL);
    else CHECK(c == NULL && err[0]);
    vlm_ckpt_close(c);
    return st;
}

static void test_good_file(void) {
    const char *p = tpath("good.safetensors");
    write_st(p, "{\"__metadata__\":{\"format\":\"pt\"},"
                "\"b\":{\"dtype\":\"BF16\",\"shape\":[2,3],\"data_offsets\":[16,28]},"
                "\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]},"
                "\"s\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[28,32]},"
                "\"z\":{\"dtype\":\"I64\",\"shape\":[0,5],\"data_offsets\":[32,32]}}    ", 32);
    vlm_ckpt *c = NULL;
    char err[256];
    CHECKF(vlm_ckpt_open(p, &c, err, sizeof err) == VLM_OK, "%s", err);
    if (!c) return;
    CHECK_EQ_INT(vlm_ckpt_count(c), 4);
    const vlm_tensor *a = vlm_ckpt_find(c, "a"), *b = vlm_ckpt_find(c, "b"), *s = vlm_ckpt_find(c, "s");
    CHECK(a && b && s && !vlm_ckpt_find(c, "__metadata__") && !vlm_ckpt_find(c, "nope"));
    if (a && b && s) {
        CHECK_EQ_INT(a->dtype, VLM_F32);
        CHECK_EQ_INT(a->shape[0], 4);
        CHECK_EQ_INT(b->ndim, 2);
        CHECK_EQ_INT(b->shape[1], 3);
        CHECK_EQ_INT(b->nbytes, 12);
        CHECK_EQ_INT(s->ndim, 0);
        CHECK_EQ_INT(vlm_tensor_numel(s), 1);
        CHECK_EQ_INT(((const unsigned char *)b->data)[0], 16); /* data byte i holds i & 0xff */
        CHECK_EQ_INT(((const unsigned char *)a->data)[5], 5);
    }
    CHECK(!strcmp(vlm_ckpt_name_at(c, 0), "a")); /* names sorted */
    vlm_ckpt_close(c);
}

static void expect_bad(const char *name, const char *hdr, size_t data_len, vlm_status want, const char *needle) {
    const char *p = tpath(name);
    write_st(p, hdr, data_len);
    char err[512];
    vlm_status st = try_open(p, err, sizeof err);
    CHECKF(st == want, "%s: got %s (%s)", name, vlm_status_name(st), err);
    CHECKF(strstr(err, needle) != NULL, "%s: message \"%s\" lacks \"%s\"", name, err, needle);
    CHECKF(strstr(err, name) != NULL, "%s: message \"%s\" does not name the file", name, err);
}

static void test_bad_files(void) {
    const char *T = "\"t\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,16]}";
    char h[512];
    snprintf(h, sizeof h, "{%s}", T);
    /* truncated: data region shorter than the offsets */
    expect_bad("truncated.safetensors", h, 10, VLM_E_FORMAT, "past the end");
    expect_bad("offsets_past_eof.safetensors",
               "{\"t\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[1000,1008]}}", 16, VLM_E_FORMAT, "past the end");
    expect_bad("wrong_dtype.safetensors", "{\"t\":{\"dtype\":\"F33\",\"shape\":[4],\"data_offsets\":[0,16]}}", 16,
               VLM_E_FORMAT, "F33");
    expect_bad("bytes_mismatch.safetensors", "{\"t\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,16]}}", 16,
               VLM_E_FORMAT, "needs 12 bytes");
    expect_bad("dtype_mismatch.safetensors", "{\"t\":{\"dtype\":\"BF16\",\"shape\":[4],\"data_offsets\":[0,16]}}", 16,
               VLM_E_FORMAT, "BF16");
    expect_bad("negative_dim.safetensors", "{\"t\":{\"dtype\":\"F32\",\"shape\":[-1,4],\"data_offsets\":[0,16]}}", 16,
               VLM_E_FORMAT, "shape");
    expect_bad("overflow_dim.safetensors",
               "{\"t\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296],\"data_offsets\":[0,16]}}", 16, VLM_E_FORMAT,
               "shape");
    expect_bad("overlap.safetensors",
               "{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]},"
               "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]}}", 16, VLM_E_FORMAT, "overlap");
    expect_bad("duplicate.safetensors",
               "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
               "\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]}}", 16, VLM_E_FORMAT, "duplicate");
    expect_bad("garbage.safetensors", "{\"t\": [1, 2, ", 16, VLM_E_FORMAT, "JSON");
    expect_bad("not_object.safetensors", "[1,2,3]", 16, VLM_E_FORMAT, "JSON");
    expect_bad("bad_offsets.safetensors", "{\"t\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,0]}}", 16,
               VLM_E_FORMAT, "data_offsets");
    /* header length past EOF */
    const char *p = tpath("hlen_past_eof.safetensors");
    FILE *f = fopen(p, "wb");
    unsigned char le[8] = {0x00, 0x10, 0, 0, 0, 0, 0, 0};
    fwrite(le, 1, 8, f);
    fputs("{}", f);
    fclose(f);
    char err[512];
    CHECK_EQ_INT(try_open(p, err, sizeof err), VLM_E_FORMAT);
    CHECK(strstr(err, "header length") != NULL);
    /* huge header length (would overflow 8 + N) */
    p = tpath("hlen_huge.safetensors");
    f = fopen(p, "wb");
    unsigned char big[8] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
    fwrite(big, 1, 8, f);
    fclose(f);
    CHECK_EQ_INT(try_open(p, err, sizeof err), VLM_E_FORMAT);
    /* zero-byte file and a 3-byte file */
    p = tpath("empty.safetensors");
    fclose(fopen(p, "wb"));
    CHECK_EQ_INT(try_open(p, err, sizeof err), VLM_E_FORMAT);
    CHECK(strstr(err, "shorter") != NULL);
    /* missing file, directory without a checkpoint */
    CHECK_EQ_INT(try_open(tpath("missing.safetensors"), err, sizeof err), VLM_E_IO);
    char d[512];
    snprintf(d, sizeof d, "%s/emptydir", tmpdir);
    mkdir(d, 0700);
    CHECK_EQ_INT(try_open(d, err, sizeof err), VLM_E_IO);
}

static void write_text(const char *path, const char *s) {
    FILE *f = fopen(path, "w");
    fputs(s, f);
    fclose(f);
}

static void test_sharded(void) {
    char d[512], p[600];
    snprintf(d, sizeof d, "%s/sharded", tmpdir);
    mkdir(d, 0700);
    snprintf(p, sizeof p, "%s/s1.safetensors", d);
    write_st(p, "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8);
    snprintf(p, sizeof p, "%s/s2.safetensors", d);
    write_st(p, "{\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4);
    snprintf(p, sizeof p, "%s/model.safetensors.index.json", d);
    write_text(p, "{\"metadata\":{\"total_size\":12},\"weight_map\":{\"a\":\"s1.safetensors\",\"b\":\"s2.safetensors\"}}");
    vlm_ckpt *c = NULL;
    char err[512];
    CHECKF(vlm_ckpt_open(d, &c, err, sizeof err) == VLM_OK, "%s", err);
    CHECK(c && vlm_ckpt_count(c) == 2 && vlm_ckpt_find(c, "a") && vlm_ckpt_find(c, "b"));
    vlm_ckpt_close(c);
    /* weight_map names a tensor no shard holds */
    write_text(p, "{\"weight_map\":{\"a\":\"s1.safetensors\",\"b\":\"s2.safetensors\",\"c\":\"s2.safetensors\"}}");
    CHECK_EQ_INT(try_open(d, err, sizeof err), VLM_E_FORMAT);
    CHECK(strstr(err, "tensor c") != NULL);
    /* weight_map assigns a tensor to the wrong shard */
    write_text(p, "{\"weight_map\":{\"a\":\"s2.safetensors\",\"b\":\"s1.safetensors\"}}");
    CHECK_EQ_INT(try_open(d, err, sizeof err), VLM_E_FORMAT);
    /* shard missing */
    write_text(p, "{\"weight_map\":{\"a\":\"s1.safetensors\",\"b\":\"s3.safetensors\"}}");
    CHECK_EQ_INT(try_open(d, err, sizeof err), VLM_E_IO);
    CHECK(strstr(err, "s3.safetensors") != NULL);
    /* path escape refused */
    write_text(p, "{\"weight_map\":{\"a\":\"../x.safetensors\"}}");
    CHECK_EQ_INT(try_open(d, err, sizeof err), VLM_E_FORMAT);
    /* garbage index */
    write_text(p, "not json");
    CHECK_EQ_INT(try_open(d, err, sizeof err), VLM_E_FORMAT);
}

/* Copies a test model's config files and rewrites its checkpoint with one tensor dropped or reshaped. */
static void test_model_load_errors(void) {
    const char *md = getenv("VLMD_TEST_MODELS");
    if (!md) { fprintf(stderr, "  VLMD_TEST_MODELS unset: model load checks skipped\n"); return; }
    char src[512];
    snprintf(src, sizeof src, "%s/tiny-f32-tied", md);
    vlm_model *m = NULL;
    char err[512];
    vlm_load_opts o = {.threads = 1};
    CHECKF(vlm_model_load(src, &o, &m, err, sizeof err) == VLM_OK, "%s", err);
    if (!m) return;
    const vlm_model_config *c = vlm_model_cfg(m);
    CHECK_EQ_INT(c->hidden, 64);
    CHECK_EQ_INT(c->n_layers, 2);
    CHECK_EQ_INT(c->n_kv_heads, 2);
    CHECK_EQ_INT(c->head_dim, 16);
    CHECK_EQ_INT(c->mrope_section[1], 3);
    CHECK(c->tie_embeddings);
    CHECK_EQ_INT(c->n_eos, 2);
    CHECK_EQ_INT(c->vision.embed_dim, 32);
    CHECK_EQ_INT(c->vision.mlp_hidden, 64);
    CHECK_EQ_INT(c->max_pixels, 12845056);
    CHECK_NEAR(vlm_model_gen_defaults(m)->repetition_penalty, 1.05, 1e-6);
    CHECK_EQ_INT(vlm_model_gen_defaults(m)->top_k, 1);
    CHECK(vlm_ckpt_find(vlm_model_ckpt(m), "visual.patch_embed.proj.weight") != NULL);
    const vlm_ckpt *ck = vlm_model_ckpt(m);
    /* rebuild the checkpoint without `drop` and with `reshape` given a wrong first dim */
    const char *cases[2][2] = {{"model.layers.1.mlp.up_proj.weight", NULL}, {NULL, "model.layers.0.self_attn.k_proj.bias"}};
    for (int k = 0; k < 2; k++) {
        char d[512], p[600];
        snprintf(d, sizeof d, "%s/broken%d", tmpdir, k);
        mkdir(d, 0700);
        char cmd[2048];
        snprintf(cmd, sizeof cmd, "cp %s/config.json %s/generation_config.json %s/", src, src, d);
        CHECK(system(cmd) == 0);
        size_t cap = 1 << 20, len = 0;
        char *hdr = malloc(cap);
        len += (size_t)snprintf(hdr, cap, "{");
        uint64_t off = 0;
        for (size_t i = 0; i < vlm_ckpt_count(ck); i++) {
            const char *nm = vlm_ckpt_name_at(ck, i);
            if (cases[k][0] && !strcmp(nm, cases[k][0])) continue;
            const vlm_tensor *t = vlm_ckpt_find(ck, nm);
            int64_t d0 = t->ndim ? t->shape[0] : 1;
            size_t nb = t->nbytes;
            if (cases[k][1] && !strcmp(nm, cases[k][1])) { d0 -= 1; nb = (size_t)d0 * 4; }
            len += (size_t)snprintf(hdr + len, cap - len, "%s\"%s\":{\"dtype\":\"%s\",\"shape\":[%lld%s", len > 1 ? "," : "",
                                    nm, vlm_dtype_name(t->dtype), (long long)d0, t->ndim > 1 ? "," : "");
            if (t->ndim > 1) len += (size_t)snprintf(hdr + len, cap - len, "%lld", (long long)t->shape[1]);
            for (int q = 2; q < t->ndim; q++) len += (size_t)snprintf(hdr + len, cap - len, ",%lld", (long long)t->shape[q]);
            len += (size_t)snprintf(hdr + len, cap - len, "],\"data_offsets\":[%llu,%llu]}", (unsigned long long)off,
                                    (unsigned long long)(off + nb));
            off += nb;
        }
        snprintf(hdr + len, cap - len, "}");
        snprintf(p, sizeof p, "%s/model.safetensors", d);
        write_st(p, hdr, (size_t)off);
        free(hdr);
        vlm_model *bm = NULL;
        vlm_status st = vlm_model_load(d, &o, &bm, err, sizeof err);
        CHECKF(st == VLM_E_FORMAT, "broken%d: %s (%s)", k, vlm_status_name(st), err);
        CHECKF(strstr(err, cases[k][0] ? cases[k][0] : cases[k][1]) != NULL, "message \"%s\"", err);
        if (k == 0) CHECK(strstr(err, "missing") != NULL);
        else CHECK(strstr(err, "shape") != NULL);
        CHECK(bm == NULL);
    }
    vlm_model_free(m);
    /* the nested-config, sharded, untied model */
    snprintf(src, sizeof src, "%s/tiny-bf16-untied", md);
    CHECKF(vlm_model_load(src, &o, &m, err, sizeof err) == VLM_OK, "%s", err);
    if (m) {
        c = vlm_model_cfg(m);
        CHECK_EQ_INT(c->hidden, 96);
        CHECK(!c->tie_embeddings);
        CHECK_EQ_INT(c->weight_dtype, VLM_BF16);
        CHECK_EQ_INT(c->mrope_section[0], 2);
        CHECK_NEAR(c->rope_theta, 1e6, 1);
        CHECK_EQ_INT(c->vision.num_heads, 3);
        CHECK(vlm_ckpt_find(vlm_model_ckpt(m), "model.visual.merger.mlp.2.weight") != NULL);
        vlm_model_free(m);
    }
    /* a directory with no config */
    CHECK_EQ_INT(vlm_model_load(tmpdir, &o, &m, err, sizeof err), VLM_E_IO);
    CHECK(strstr(err, "config.json") != NULL);
}

int main(void) {
    snprintf(tmpdir, sizeof tmpdir, "/tmp/vlmd-test-st-XXXXXX");
    if (!mkdtemp(tmpdir)) { perror("mkdtemp"); return 1; }
    RUN(test_good_file);
    RUN(test_bad_files);
    RUN(test_sharded);
    RUN(test_model_load_errors);
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmpdir);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", tmpdir);
    TEST_MAIN_END("safetensors");
}
