/* cmd_serve.c — placeholder until the serve subcommand lands; reports that it is not built. */
#include <stdio.h>

#include "server/server.h"

int vlmd_cmd_serve(int argc, char **argv) {
    (void)argc;
    (void)argv;
    fprintf(stderr, "vlmd serve: not implemented in this build\n");
    return 2;
}
