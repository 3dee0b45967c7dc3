#!/usr/bin/env bash
# chat-image.sh — asks vlmd (or any OpenAI-compatible server) about a local image: the file is
# base64-encoded into a data: URL inside a chat request; prints the answer.
#
#   VLMD_URL=http://127.0.0.1:8000 ./chat-image.sh photo.jpg "What is in this picture?"
#
# Environment: VLMD_URL (default http://127.0.0.1:8000), VLMD_API_KEY (sent as a Bearer token when
# set), VLMD_MODEL (the "model" field; left out when unset, which vlmd accepts), VLMD_MAX_TOKENS
# (default 256). Needs curl and jq. On an HTTP error it prints the server's error message and
# exits 1.
set -euo pipefail
url=${VLMD_URL:-http://127.0.0.1:8000}
[ $# -ge 1 ] || { echo "usage: $0 IMAGE [PROMPT]" >&2; exit 2; }
image=$1
prompt=${2:-Describe this image.}
[ -r "$image" ] || { echo "error: cannot read $image" >&2; exit 2; }
case "${image,,}" in
    *.png) mime=image/png ;;
    *.jpg | *.jpeg) mime=image/jpeg ;;
    *.webp) mime=image/webp ;;
    *.gif) mime=image/gif ;;
    *) echo "error: $image: use a .png, .jpg, .webp or .gif file" >&2; exit 2 ;;
esac

# The base64 text goes through stdin, never the command line (arguments are limited to 128 KiB).
body=$(mktemp)
out=$(mktemp)
trap 'rm -f "$body" "$out"' EXIT
base64 -w0 "$image" | jq -Rs --arg mime "$mime" --arg prompt "$prompt" \
    --arg model "${VLMD_MODEL:-}" --argjson max "${VLMD_MAX_TOKENS:-256}" '
    {messages: [{role: "user", content: [
        {type: "image_url", image_url: {url: ("data:" + $mime + ";base64," + .)}},
        {type: "text", text: $prompt}]}],
     max_tokens: $max}
    + (if $model != "" then {model: $model} else {} end)' > "$body"

auth=()
[ -n "${VLMD_API_KEY:-}" ] && auth=(-H "Authorization: Bearer $VLMD_API_KEY")
status=$(curl -sS -o "$out" -w '%{http_code}' "${auth[@]}" -H 'Content-Type: application/json' \
    --data-binary @"$body" "$url/v1/chat/completions") || {
    echo "error: could not reach $url (curl exit $?)" >&2; exit 1; }
if [ "$status" -ge 400 ]; then
    msg=$(jq -r '"\(.error.code // "error"): \(.error.message)"' "$out" 2>/dev/null || head -c 300 "$out")
    echo "error: HTTP $status from $url: $msg" >&2
    exit 1
fi
jq -r '.choices[0].message.content' "$out"
