#!/bin/bash
# docker-entrypoint.sh — the container's entrypoint: `vlmd serve` with settings from the
# environment. Every VLMD_<NAME>=value becomes --<name> value (VLMD_MAX_SEQS=32 -> --max-seqs 32;
# "true" alone gives a switch such as --allow-remote-media, "false" leaves it out), placed BEFORE
# the container's arguments so explicit flags win. VLMD_API_KEY is left to vlmd, which reads it
# itself and never logs it. Precedence: --config file < VLMD_* environment < flags. Only names
# that `vlmd serve --help` lists are mapped; any other VLMD_* variable is reported and ignored.
set -euo pipefail
vlmd=${VLMD:-vlmd}
known=" $("$vlmd" serve --help | sed -n 's/^  --\([a-z0-9-]*\).*/\1/p' | tr '\n' ' ') "
env_flags=()
while IFS='=' read -r -d '' name value; do
    case "$name" in
        VLMD_API_KEY) continue ;;
        VLMD_?*) ;;
        *) continue ;;
    esac
    flag=${name#VLMD_}
    flag=${flag,,}
    flag=${flag//_/-}
    if [[ "$known" != *" $flag "* ]]; then
        echo "vlmd-entrypoint: ignoring $name: vlmd serve has no --$flag" >&2
        continue
    fi
    case "$value" in
        true) env_flags+=("--$flag") ;;
        false) ;;
        *) env_flags+=("--$flag" "$value") ;;
    esac
done < <(env -0)
if [ "${1:-}" = serve ]; then
    shift
    exec "$vlmd" serve "${env_flags[@]}" "$@"
fi
exec "$vlmd" "$@"
