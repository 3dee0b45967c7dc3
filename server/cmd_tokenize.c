/* cmd_tokenize.c — placeholder until the tokenize subcommand lands; reports that it is not built. */
#include <stdio.h>

#include "server/server.h"

int vlmd_cmd_tokenize(int argc, char **argv) {
    (void)argc;
    (void)argv;
    fprintf(stderr, "vlmd tokenize: not implemented in this build\n");
    return 2;
}

int vlmd_cmd_detokenize(int argc, char **argv) {
    (void)argc;
    (void)argv;
    fprintf(stderr, "vlmd detokenize: not implemented in this build\n");
    return 2;
}
