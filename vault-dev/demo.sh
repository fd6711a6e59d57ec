#!/usr/bin/env bash
# The whole flow end to end against a throwaway dev server: `make demo` runs this.
# Environments env-base → env-prod → env-team, a runtime override, an agent with a GitHub stdio
# MCP server and an HTTP MCP server, a runner under `stigmer-broker run`, then proof that the
# files are gone, the token is revoked and the context destroyed.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
broker="${STIGMER_BROKER:-stigmer-broker}"
state="$(mktemp -d)"
out="$(mktemp -d -p /dev/shm stigmer-demo.XXXXXX)"
log="$(mktemp -d -p /dev/shm stigmer-demo-log.XXXXXX)/run.log"
tenant=demo
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
cleanup() { "$broker" dev down --state-dir "$state" >/dev/null 2>&1 || true; rm -rf "$state" "$out" "$(dirname "$log")"; }
trap cleanup EXIT

step "start a throwaway dev server and bootstrap it (mounts, Transit key, JWT auth, policies)"
"$broker" dev up --state-dir "$state" --tenant "$tenant"
# shellcheck disable=SC1091
source "$state/env"

step "store three Environments (secret values are encrypted with Transit on arrival)"
"$broker" env apply -f "$here/demo/environments.yaml" --tenant "$tenant"
"$broker" env list --tenant "$tenant"
echo "-- env get env-prod (what Vault holds, masked):"
"$broker" env get env-prod --tenant "$tenant"

step "create the execution: env_spec → env-base → env-prod → env-team → runtime_env"
printf 'sk-demo-runtime-special-0042\n' | "$broker" execution create --tenant "$tenant" \
  --agent "$here/demo/agent.yaml" --instance "$here/demo/instance.yaml" \
  --runtime-env LOG_LEVEL=debug --secret SPECIAL_TOKEN --ttl 15m -o json > "$state/execution.json"
cat "$state/execution.json"
execution="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["id"])' "$state/execution.json")"

step "the control plane sees only ciphertext and masks it"
"$broker" execution show "$execution" --tenant "$tenant"

step "run the runner under the broker (JWT login as the runner's service account)"
"$broker" dev token --tenant "$tenant" --pod pr-reviewer-0 > "$state/sa.jwt"
"$broker" run --tenant "$tenant" --execution "$execution" --out "$out" \
  --jwt-file "$state/sa.jwt" -- python3 "$here/demo/runner.py" 2> "$log"
echo "runner exited with status $?"
echo "-- the broker's log (JSON lines):"
cat "$log"

step "afterwards: files gone, token revoked, context destroyed"
if [ -e "$out/$execution" ]; then echo "FAIL: $out/$execution still exists"; exit 1; fi
echo "files: $out/$execution is gone"
accessor="$(python3 -c 'import json,sys
for line in open(sys.argv[1]):
    entry = json.loads(line)
    if entry.get("msg") == "logged in": print(entry["accessor"])' "$log")"
if curl -sf -H "X-Vault-Token: $VAULT_TOKEN" -X POST -d "{\"accessor\":\"$accessor\"}" \
    "$VAULT_ADDR/v1/auth/token/lookup-accessor" >/dev/null; then
  echo "FAIL: token $accessor is still valid"; exit 1
fi
echo "token: accessor $accessor no longer resolves (revoked)"
if "$broker" execution show "$execution" --tenant "$tenant" 2>"$state/show.err"; then
  echo "FAIL: context still readable"; exit 1
fi
echo "context: $(cat "$state/show.err")"

step "the reaper: an execution nobody ran expires, and one pass destroys it (metadata only)"
printf 'sk-demo-abandoned-0099\n' | "$broker" execution create --tenant "$tenant" \
  --agent "$here/demo/agent.yaml" --instance "$here/demo/instance.yaml" --secret SPECIAL_TOKEN \
  --ttl 2s --id abandoned-1 >/dev/null
"$broker" execution list --tenant "$tenant"
sleep 3
"$broker" dev token --tenant stigmer-system --service-account stigmer-reaper > "$state/reaper.jwt"
env -u VAULT_TOKEN "$broker" --log-level warning reaper --tenant "$tenant" --once --grace 0s \
  --jwt-file "$state/reaper.jwt"
if "$broker" execution show abandoned-1 --tenant "$tenant" >/dev/null 2>&1; then
  echo "FAIL: the abandoned context is still there"; exit 1
fi
echo "context abandoned-1: destroyed by the reaper"

step "stop the dev server"
"$broker" dev down --state-dir "$state"
echo
echo "demo finished: the whole flow ran end to end."
