#!/usr/bin/env bash
# models.sh — lists the models a server offers (GET /v1/models): one line per model, its id and,
# where the server reports it (vlmd does), its context length.
#
#   VLMD_URL=http://lb.example:8080 ./models.sh
#
# Environment: VLMD_URL (default http://127.0.0.1:8000), VLMD_API_KEY (Bearer token when set).
# Needs curl and jq. On an HTTP error it prints the server's error message and exits 1.
set -euo pipefail
url=${VLMD_URL:-http://127.0.0.1:8000}
out=$(mktemp)
trap 'rm -f "$out"' EXIT
auth=()
[ -n "${VLMD_API_KEY:-}" ] && auth=(-H "Authorization: Bearer $VLMD_API_KEY")
status=$(curl -sS -o "$out" -w '%{http_code}' "${auth[@]}" "$url/v1/models") || {
    echo "error: could not reach $url (curl exit $?)" >&2; exit 1; }
if [ "$status" -ge 400 ]; then
    msg=$(jq -r '"\(.error.code // "error"): \(.error.message)"' "$out" 2>/dev/null || head -c 300 "$out")
    echo "error: HTTP $status from $url: $msg" >&2
    exit 1
fi
jq -r '.data[] | "\(.id)\tmax_model_len=\(.max_model_len // "?")"' "$out"
