/* errors.c — the one table that turns an internal failure into an HTTP status, an OpenAI error
 * `type` and `code`, and the one function that writes the error object clients see:
 *   {"error": {"message": ..., "type": ..., "param": ... | null, "code": ... | null}} */
#include <stdlib.h>

#include "server/serve.h"

/* Types follow what api.openai.com returns (invalid_request_error for client mistakes,
 * authentication_error, rate-limit and server errors) so SDK exception classes line up. */
static const vlmd_err_info TABLE[VLMD_ERR_COUNT] = {
    {VLMD_ERR_BAD_JSON, 400, "invalid_request_error", "invalid_json"},
    {VLMD_ERR_INVALID, 400, "invalid_request_error", "invalid_value"},
    {VLMD_ERR_IMAGE, 400, "invalid_request_error", "invalid_image"},
    {VLMD_ERR_LIMIT, 400, "invalid_request_error", "limit_exceeded"},
    {VLMD_ERR_CONTEXT, 400, "invalid_request_error", "context_length_exceeded"},
    {VLMD_ERR_UNSUPPORTED, 400, "invalid_request_error", "unsupported"},
    {VLMD_ERR_AUTH, 401, "authentication_error", "invalid_api_key"},
    {VLMD_ERR_NOT_FOUND, 404, "invalid_request_error", "not_found"},
    {VLMD_ERR_MODEL_NOT_FOUND, 404, "invalid_request_error", "model_not_found"},
    {VLMD_ERR_METHOD, 405, "invalid_request_error", "method_not_allowed"},
    {VLMD_ERR_READ_TIMEOUT, 408, "invalid_request_error", "request_timeout"},
    {VLMD_ERR_TOO_LARGE, 413, "invalid_request_error", "request_too_large"},
    {VLMD_ERR_QUEUE_FULL, 429, "rate_limit_error", "queue_full"},
    {VLMD_ERR_INTERNAL, 500, "server_error", "internal_error"},
    {VLMD_ERR_UNAVAILABLE, 503, "server_error", "unavailable"},
    {VLMD_ERR_TIMEOUT, 504, "server_error", "timeout"},
};

const vlmd_err_info *vlmd_err_lookup(vlmd_err e) {
    VLM_ASSERT(e >= 0 && e < VLMD_ERR_COUNT && TABLE[e].kind == e);
    return &TABLE[e];
}

vlmd_err vlmd_err_from_status(vlm_status st) {
    switch (st) {
    case VLM_E_INVALID: return VLMD_ERR_INVALID;
    case VLM_E_FORMAT: return VLMD_ERR_IMAGE;     /* only images are parsed from client bytes */
    case VLM_E_IO: return VLMD_ERR_IMAGE;         /* remote fetch failures */
    case VLM_E_LIMIT: return VLMD_ERR_LIMIT;
    case VLM_E_UNSUPPORTED: return VLMD_ERR_UNSUPPORTED;
    case VLM_E_CAPACITY: return VLMD_ERR_UNAVAILABLE;
    case VLM_E_CANCELLED: return VLMD_ERR_UNAVAILABLE;
    case VLM_OK:
    case VLM_E_NOMEM:
    case VLM_E_INTERNAL:
    default: return VLMD_ERR_INTERNAL;
    }
}

char *vlmd_err_json(vlmd_err e, const char *message, const char *param) {
    const vlmd_err_info *in = vlmd_err_lookup(e);
    cJSON *root = cJSON_CreateObject();
    cJSON *o = cJSON_AddObjectToObject(root, "error");
    cJSON_AddStringToObject(o, "message", message && message[0] ? message : in->code);
    cJSON_AddStringToObject(o, "type", in->type);
    if (param && param[0])
        cJSON_AddStringToObject(o, "param", param);
    else
        cJSON_AddNullToObject(o, "param");
    cJSON_AddStringToObject(o, "code", in->code);
    char *s = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    return s;
}
