#!/usr/bin/env bash
# Serve a Docker registry on loopback (default 127.0.0.1:5000) from Debian's docker-registry,
# with its storage in a cache folder outside the repository. Idempotent: when something already
# answers the registry API at the address, nothing is started.
#
# Environment: LAB_REGISTRY_ADDR (default 127.0.0.1:5000), LAB_REGISTRY_DIR (default
# ${XDG_CACHE_HOME:-$HOME/.cache}/lab-docker/registry: not under ~/.cache/lab, the runner's build
# cache, which native evaluations may write). Docker treats 127.0.0.0/8 as an insecure registry
# by default, so plain HTTP needs no engine configuration.
set -euo pipefail

ADDR="${LAB_REGISTRY_ADDR:-127.0.0.1:5000}"
DIR="${LAB_REGISTRY_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/lab-docker/registry}"
WAIT_S="${LAB_REGISTRY_WAIT_S:-30}"

say() { echo "start-registry: $*" >&2; }
die() { say "$*"; exit 1; }

# GET /v2/ answers 200 (or 401 with auth) on any registry of the v2 API.
registry_answers() {
    python3 - "$ADDR" <<'PY' >/dev/null 2>&1
import sys, urllib.request, urllib.error
try:
    urllib.request.urlopen(f"http://{sys.argv[1]}/v2/", timeout=2)
except urllib.error.HTTPError as e:
    sys.exit(0 if e.code == 401 else 1)
PY
}

registry_answers && exit 0

if ! command -v docker-registry >/dev/null 2>&1; then
    [ "$(id -u)" -eq 0 ] || die "docker-registry is missing; install it as root: apt-get install docker-registry"
    say "installing docker-registry from Debian"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker-registry >/dev/null
fi

mkdir -p "$DIR/storage"
cat >"$DIR/config.yml" <<YML
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $DIR/storage
  delete:
    enabled: true
http:
  addr: $ADDR
YML
say "serving a registry on $ADDR (storage: $DIR/storage, log: $DIR/registry.log)"
setsid nohup docker-registry serve "$DIR/config.yml" >"$DIR/registry.log" 2>&1 </dev/null &

tries=0
until registry_answers; do
    if [ "$tries" -ge $((WAIT_S * 2)) ]; then
        tail -n 20 "$DIR/registry.log" >&2 || true
        die "the registry did not answer on $ADDR within ${WAIT_S}s (see $DIR/registry.log)"
    fi
    sleep 0.5
    tries=$((tries + 1))
done
