/* main.c — the `vlmd` binary: dispatches to the subcommands. Each subcommand lives in
 * server/cmd_<name>.c and parses its own flags. */
#include <stdio.h>
#include <string.h>

#include "server/server.h"

static void usage(FILE *f) {
    fprintf(f,
            "vlmd %s — vision-language model server (Qwen2-VL, NVLM-D, Qwen2)\n"
            "\n"
            "usage: vlmd <command> [flags]\n"
            "\n"
            "commands:\n"
            "  serve        OpenAI-compatible HTTP server (vlmd serve --help)\n"
            "  generate     one generation from the command line (vlmd generate --help)\n"
            "  tokenize     JSON lines {\"text\"} on stdin -> {\"ids\"} on stdout\n"
            "  detokenize   JSON lines {\"ids\"} on stdin -> {\"text\"} on stdout\n"
            "  help         this text\n"
            "  --version    print the version\n",
            VLMD_VERSION);
}

int main(int argc, char **argv) {
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    const char *cmd = argv[1];
    if (!strcmp(cmd, "serve")) return vlmd_cmd_serve(argc - 1, argv + 1);
    if (!strcmp(cmd, "generate")) return vlmd_cmd_generate(argc - 1, argv + 1);
    if (!strcmp(cmd, "tokenize")) return vlmd_cmd_tokenize(argc - 1, argv + 1);
    if (!strcmp(cmd, "detokenize")) return vlmd_cmd_detokenize(argc - 1, argv + 1);
    if (!strcmp(cmd, "--version") || !strcmp(cmd, "version")) {
        printf("vlmd %s\n", VLMD_VERSION);
        return 0;
    }
    if (!strcmp(cmd, "help") || !strcmp(cmd, "--help") || !strcmp(cmd, "-h")) {
        usage(stdout);
        return 0;
    }
    fprintf(stderr, "vlmd: unknown command '%s'\n\n", cmd);
    usage(stderr);
    return 2;
}
