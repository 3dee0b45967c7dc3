/* tok_internal.h — the tokenizer layer's private structures, shared by tokenizer.c (load, encode,
 * decode) and chat.c (templates). Not part of the public contract (tokenizer/tokenizer.h). */
#ifndef VLM_TOK_INTERNAL_H
#define VLM_TOK_INTERNAL_H

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <pthread.h>

#include <stdio.h>
#include <stdlib.h>

#include "tokenizer/tokenizer.h"

/* Broken invariant (never bad input): print where and abort. */
#define VLM_TOK_ASSERT(c)                                                                   \
    do {                                                                                    \
        if (!(c)) {                                                                         \
            fprintf(stderr, "%s:%d: tokenizer invariant failed: %s\n", __FILE__, __LINE__, #c); \
            abort();                                                                        \
        }                                                                                   \
    } while (0)

typedef struct {
    char *content;
    size_t len;
    int32_t id;
    bool special, lstrip, rstrip, normalized, single_word;
} tok_added;

/* Word -> ids cache, split into shards so concurrent encoders rarely contend; each shard has its
 * own mutex and is simply cleared when it fills up (words repeat heavily, so a cleared shard
 * refills with the hot words quickly). */
#define TOK_CACHE_SHARDS 64
#define TOK_CACHE_SLOTS 2048 /* per shard, power of two */
#define TOK_CACHE_MAX_WORD 48 /* bytes; longer words are rare and not worth caching */
typedef struct {
    uint64_t hash;
    uint8_t *blob; /* key bytes then ids (int32), malloc'd; NULL = empty slot */
    uint16_t klen, nids;
} tok_cache_slot;
typedef struct {
    pthread_mutex_t mu;
    size_t used;
    tok_cache_slot slots[TOK_CACHE_SLOTS];
} tok_cache_shard;

struct vlm_tok {
    /* vocab: id -> mapped token string (byte-level code points), and a hash of string -> id */
    int32_t n_vocab_slots; /* highest id + 1 */
    char *arena;           /* all token strings (mapped form), NUL-separated */
    size_t arena_len;
    int64_t *tok_off;      /* [n_vocab_slots] offset in arena or -1 */
    uint32_t *tok_len;
    int32_t *vhash;        /* open addressing, -1 empty */
    size_t vhash_mask;
    /* decoded bytes for each id (HF ByteLevel decoder rule) */
    uint8_t *dec_arena;
    int64_t *dec_off; /* [n_vocab_slots + 1] */
    /* merges: key (a<<32|b) -> rank, merged id */
    uint64_t *mkeys;
    int32_t *mrank, *mnew;
    size_t mmask;
    /* byte level */
    int32_t byte_id[256]; /* initial id of each byte's mapped char */
    /* added tokens */
    tok_added *added;
    size_t n_added;
    uint8_t added_first[256]; /* bit 0: some raw added token starts with this byte, bit 1: normalized */
    bool *is_special; /* [n_vocab_slots] */
    bool has_nfc;
    /* pre-tokenizer */
    pcre2_code *re;
    bool re_jit;
    /* post-processor (TemplateProcessing "single"), ids to add around a sequence */
    int32_t *pre_ids, *post_ids;
    size_t n_pre, n_post;
    /* chat template text from tokenizer_config.json / chat_template.json (may be NULL) */
    char *chat_template;
    tok_cache_shard *cache;
};

#endif
