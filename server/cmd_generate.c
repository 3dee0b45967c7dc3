/* cmd_generate.c — placeholder until the generate subcommand lands; reports that it is not built. */
#include <stdio.h>

#include "server/server.h"

int vlmd_cmd_generate(int argc, char **argv) {
    (void)argc;
    (void)argv;
    fprintf(stderr, "vlmd generate: not implemented in this build\n");
    return 2;
}
