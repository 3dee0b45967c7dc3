/* server.h — the one public header of the server layer: `vlmd serve` (HTTP on libmicrohttpd,
 * OpenAI protocol with cJSON, admission queue and the engine thread) and the other subcommands'
 * entry points used by server/main.c. */
#ifndef VLM_SERVER_H
#define VLM_SERVER_H

#ifdef __cplusplus
extern "C" {
#endif

#define VLMD_VERSION "0.1.0"

int vlmd_cmd_serve(int argc, char **argv);
int vlmd_cmd_generate(int argc, char **argv);
int vlmd_cmd_tokenize(int argc, char **argv);
int vlmd_cmd_detokenize(int argc, char **argv);

#ifdef __cplusplus
}
#endif
#endif
