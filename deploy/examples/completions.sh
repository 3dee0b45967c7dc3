#!/usr/bin/env bash
# completions.sh — raw text completion (POST /v1/completions): continues PROMPT, no chat template.
#
#   ./completions.sh "The capital of France is"
#
# Environment: VLMD_URL (default http://127.0.0.1:8000), VLMD_API_KEY (Bearer token when set),
# VLMD_MODEL (optional "model" field), VLMD_MAX_TOKENS (default 64). Needs curl and jq. On an HTTP
# error it prints the server's error message and exits 1.
set -euo pipefail
url=${VLMD_URL:-http://127.0.0.1:8000}
[ $# -ge 1 ] || { echo "usage: $0 PROMPT" >&2; exit 2; }

out=$(mktemp)
trap 'rm -f "$out"' EXIT
auth=()
[ -n "${VLMD_API_KEY:-}" ] && auth=(-H "Authorization: Bearer $VLMD_API_KEY")
status=$(jq -n --arg prompt "$1" --arg model "${VLMD_MODEL:-}" --argjson max "${VLMD_MAX_TOKENS:-64}" \
        '{prompt: $prompt, max_tokens: $max} + (if $model != "" then {model: $model} else {} end)' |
    curl -sS -o "$out" -w '%{http_code}' "${auth[@]}" -H 'Content-Type: application/json' \
        --data-binary @- "$url/v1/completions") || {
    echo "error: could not reach $url (curl exit $?)" >&2; exit 1; }
if [ "$status" -ge 400 ]; then
    msg=$(jq -r '"\(.error.code // "error"): \(.error.message)"' "$out" 2>/dev/null || head -c 300 "$out")
    echo "error: HTTP $status from $url: $msg" >&2
    exit 1
fi
jq -r '.choices[0].text' "$out"
