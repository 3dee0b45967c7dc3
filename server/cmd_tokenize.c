/* cmd_tokenize.c — `vlmd tokenize` and `vlmd detokenize`: JSON lines on stdin, JSON lines on stdout.
 *
 *   vlmd tokenize --tokenizer PATH [--add-special]    {"text": "..."}  -> {"ids": [...]}
 *   vlmd detokenize --tokenizer PATH [--skip-special] {"ids": [...]}   -> {"text": "..."}
 *
 * A bad line (invalid JSON, missing field, invalid UTF-8, an unknown id) stops the command with a
 * message naming the line number on stderr and exit status 1; earlier lines' output stays written. */
#include <cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "server/server.h"
#include "tokenizer/tokenizer.h"

static int usage(const char *cmd, FILE *f, int rc) {
    if (!strcmp(cmd, "tokenize"))
        fprintf(f, "usage: vlmd tokenize --tokenizer PATH [--add-special]\n"
                   "  reads JSON lines {\"text\": \"...\"} on stdin, writes {\"ids\": [...]} per line\n");
    else
        fprintf(f, "usage: vlmd detokenize --tokenizer PATH [--skip-special]\n"
                   "  reads JSON lines {\"ids\": [...]} on stdin, writes {\"text\": \"...\"} per line\n");
    return rc;
}

static int run(int argc, char **argv, bool tokenize) {
    const char *cmd = tokenize ? "tokenize" : "detokenize";
    const char *path = NULL;
    bool flag = false;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--tokenizer") && i + 1 < argc) path = argv[++i];
        else if (!strncmp(argv[i], "--tokenizer=", 12)) path = argv[i] + 12;
        else if (tokenize && !strcmp(argv[i], "--add-special")) flag = true;
        else if (!tokenize && !strcmp(argv[i], "--skip-special")) flag = true;
        else if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) return usage(cmd, stdout, 0);
        else {
            fprintf(stderr, "vlmd %s: unknown argument '%s'\n", cmd, argv[i]);
            return usage(cmd, stderr, 2);
        }
    }
    if (!path) {
        fprintf(stderr, "vlmd %s: --tokenizer PATH is required\n", cmd);
        return usage(cmd, stderr, 2);
    }
    char err[512];
    vlm_tok *t = NULL;
    if (vlm_tok_load(path, &t, err, sizeof err)) {
        fprintf(stderr, "vlmd %s: %s\n", cmd, err);
        return 1;
    }
    int rc = 0;
    char *line = NULL;
    size_t cap = 0;
    ssize_t len;
    size_t lineno = 0;
    while ((len = getline(&line, &cap, stdin)) >= 0) {
        lineno++;
        while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r')) len--;
        if (len == 0) continue; /* blank lines carry no request */
        cJSON *j = cJSON_ParseWithLength(line, (size_t)len);
        if (!j || !cJSON_IsObject(j)) {
            fprintf(stderr, "vlmd %s: line %zu: invalid JSON\n", cmd, lineno);
            cJSON_Delete(j);
            rc = 1;
            break;
        }
        cJSON *o = cJSON_CreateObject();
        if (tokenize) {
            const cJSON *text = cJSON_GetObjectItemCaseSensitive(j, "text");
            if (!cJSON_IsString(text)) {
                fprintf(stderr, "vlmd %s: line %zu: expected {\"text\": string}\n", cmd, lineno);
                rc = 1;
            } else {
                vlm_ids ids = {0};
                /* cJSON strings end at an embedded NUL (\u0000); the text is what precedes it. */
                if (vlm_tok_encode(t, text->valuestring, strlen(text->valuestring), flag, &ids, err, sizeof err)) {
                    fprintf(stderr, "vlmd %s: line %zu: %s\n", cmd, lineno, err);
                    rc = 1;
                } else {
                    cJSON *arr = cJSON_AddArrayToObject(o, "ids");
                    for (size_t k = 0; k < ids.n; k++) cJSON_AddItemToArray(arr, cJSON_CreateNumber(ids.ids[k]));
                }
                vlm_ids_free(&ids);
            }
        } else {
            const cJSON *arr = cJSON_GetObjectItemCaseSensitive(j, "ids");
            size_t n = cJSON_IsArray(arr) ? (size_t)cJSON_GetArraySize(arr) : 0;
            int32_t *ids = malloc((n + 1) * sizeof(int32_t));
            size_t k = 0;
            bool ok = cJSON_IsArray(arr);
            const cJSON *it;
            if (ok) cJSON_ArrayForEach(it, arr) {
                if (!cJSON_IsNumber(it) || it->valuedouble != (double)(int32_t)it->valuedouble) {
                    ok = false;
                    break;
                }
                ids[k++] = (int32_t)it->valuedouble;
            }
            char *s = NULL;
            size_t sl = 0;
            if (!ok) fprintf(stderr, "vlmd %s: line %zu: expected {\"ids\": [integer, ...]}\n", cmd, lineno);
            else if (!(s = vlm_tok_decode(t, ids, n, flag, &sl)))
                fprintf(stderr, "vlmd %s: line %zu: id out of range (vocabulary has %d ids)\n", cmd, lineno,
                        vlm_tok_vocab_size(t));
            if (s) cJSON_AddStringToObject(o, "text", s);
            else rc = 1;
            free(s);
            free(ids);
        }
        cJSON_Delete(j);
        if (rc) {
            cJSON_Delete(o);
            break;
        }
        char *outs = cJSON_PrintUnformatted(o);
        cJSON_Delete(o);
        fputs(outs, stdout);
        fputc('\n', stdout);
        free(outs);
    }
    free(line);
    vlm_tok_free(t);
    if (fflush(stdout)) rc = 1;
    return rc;
}

int vlmd_cmd_tokenize(int argc, char **argv) { return run(argc, argv, true); }
int vlmd_cmd_detokenize(int argc, char **argv) { return run(argc, argv, false); }
