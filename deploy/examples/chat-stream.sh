#!/usr/bin/env bash
# chat-stream.sh — streaming chat: prints the answer token by token as the server sends it
# (Server-Sent Events, "stream": true), optionally about a local image.
#
#   ./chat-stream.sh "Write a haiku about load balancers."
#   ./chat-stream.sh "What is in this picture?" photo.jpg
#
# Environment: VLMD_URL (default http://127.0.0.1:8000), VLMD_API_KEY (Bearer token when set),
# VLMD_MODEL (optional "model" field), VLMD_MAX_TOKENS (default 256). Needs curl and jq. On an HTTP
# error, or an error event inside the stream, it prints the server's message and exits 1.
set -euo pipefail
url=${VLMD_URL:-http://127.0.0.1:8000}
[ $# -ge 1 ] || { echo "usage: $0 PROMPT [IMAGE]" >&2; exit 2; }
prompt=$1
image=${2:-}

body=$(mktemp)
trap 'rm -f "$body"' EXIT
if [ -n "$image" ]; then
    [ -r "$image" ] || { echo "error: cannot read $image" >&2; exit 2; }
    case "${image,,}" in
        *.png) mime=image/png ;;
        *.jpg | *.jpeg) mime=image/jpeg ;;
        *.webp) mime=image/webp ;;
        *.gif) mime=image/gif ;;
        *) echo "error: $image: use a .png, .jpg, .webp or .gif file" >&2; exit 2 ;;
    esac
    base64 -w0 "$image" | jq -Rs --arg mime "$mime" --arg prompt "$prompt" \
        '[{type: "image_url", image_url: {url: ("data:" + $mime + ";base64," + .)}}, {type: "text", text: $prompt}]'
else
    jq -n --arg prompt "$prompt" '$prompt'
fi | jq --arg model "${VLMD_MODEL:-}" --argjson max "${VLMD_MAX_TOKENS:-256}" '
    {messages: [{role: "user", content: .}], max_tokens: $max, stream: true}
    + (if $model != "" then {model: $model} else {} end)' > "$body"

auth=()
[ -n "${VLMD_API_KEY:-}" ] && auth=(-H "Authorization: Bearer $VLMD_API_KEY")
# -N: no output buffering in curl; --unbuffered: none in jq either, so each token shows at once.
# --fail-with-body: on an HTTP error curl still passes the JSON error body on, then exits 22.
# Each SSE line is "data: {chunk}", "data: [DONE]", ": ping" or empty; anything else is the body
# of an HTTP error.
set +e
curl -sS -N --fail-with-body "${auth[@]}" -H 'Content-Type: application/json' \
    --data-binary @"$body" "$url/v1/chat/completions" |
jq --unbuffered -Rrj '
    if startswith("data: [DONE]") then "\n"
    elif startswith("data: ") then
        (.[6:] | fromjson) as $c
        | if $c.error then ("\nerror: in the stream: \($c.error.code // "error"): \($c.error.message)\n" | halt_error(1))
          else ($c.choices[0].delta.content? // "") end
    elif startswith("{") then
        (fromjson? // {}) as $e
        | ("error: HTTP error from the server: \($e.error.code // "error"): \($e.error.message // .)\n" | halt_error(1))
    else empty end'
rc=("${PIPESTATUS[@]}")
set -e
if [ "${rc[1]}" -ne 0 ]; then exit 1; fi      # jq already printed the server's message
if [ "${rc[0]}" -ne 0 ]; then
    echo "error: request to $url failed (curl exit ${rc[0]})" >&2
    exit 1
fi
