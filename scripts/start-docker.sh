#!/usr/bin/env bash
# Make a Docker engine answer on this machine, offline, and make the base image the tests build
# on. Idempotent: when the engine answers and the image exists it returns in well under a second.
#
#   1. install docker.io, debootstrap and docker-registry from Debian when missing (needs root);
#   2. start dockerd in the background when no engine answers (--iptables=false --bridge=none:
#      builds use network_mode=host, evaluation containers network_mode=none);
#   3. make local/debian:bookworm from Debian's packages with debootstrap (minbase: no python)
#      when it is absent, since no registry can be reached to pull a base image.
#
# Environment: LAB_BASE_IMAGE (default local/debian:bookworm), LAB_DEBIAN_MIRROR (default: the
# mirror apt already uses), DOCKER_HOST (an engine elsewhere: then nothing is started here).
set -euo pipefail

BASE_IMAGE="${LAB_BASE_IMAGE:-local/debian:bookworm}"
STATE_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/lab-docker"
DOCKERD_LOG="$STATE_DIR/dockerd.log"
WAIT_S="${LAB_DOCKER_WAIT_S:-60}"

say() { echo "start-docker: $*" >&2; }
die() { say "$*"; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"
    elif command -v sudo >/dev/null 2>&1; then sudo -n "$@"
    else die "need root for: $*"; fi
}

# The Debian engine's own client when installed: it speaks the engine's API version.
docker_cli() {
    if [ -x /usr/bin/docker ]; then /usr/bin/docker "$@"; else docker "$@"; fi
}

engine_answers() { docker_cli version --format '{{.Server.Version}}' >/dev/null 2>&1; }

install_missing() {
    local pkgs=()
    command -v dockerd >/dev/null 2>&1 || pkgs+=(docker.io)
    command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || pkgs+=(debootstrap)
    command -v docker-registry >/dev/null 2>&1 || pkgs+=(docker-registry)
    [ ${#pkgs[@]} -eq 0 ] && return 0
    say "installing ${pkgs[*]} from Debian"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${pkgs[@]}" >/dev/null
}

start_engine() {
    engine_answers && return 0
    if [ -n "${DOCKER_HOST:-}" ]; then
        die "no Docker engine answers at DOCKER_HOST=$DOCKER_HOST (this script starts one only locally)"
    fi
    mkdir -p "$STATE_DIR"
    if ! pgrep -x dockerd >/dev/null 2>&1; then
        say "starting dockerd (log: $DOCKERD_LOG)"
        # setsid + nohup: the engine outlives this script and the shell that ran it.
        as_root setsid nohup dockerd --iptables=false --bridge=none >"$DOCKERD_LOG" 2>&1 </dev/null &
    fi
    local waited=0
    until engine_answers; do
        if [ "$waited" -ge "$WAIT_S" ]; then
            tail -n 20 "$DOCKERD_LOG" >&2 2>/dev/null || true
            die "dockerd did not answer within ${WAIT_S}s (see $DOCKERD_LOG)"
        fi
        sleep 1
        waited=$((waited + 1))
    done
    say "engine $(docker_cli version --format '{{.Server.Version}}') answers"
}

debian_mirror() {
    if [ -n "${LAB_DEBIAN_MIRROR:-}" ]; then echo "$LAB_DEBIAN_MIRROR"; return; fi
    local m
    m=$(grep -hsE '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v security | head -n1 || true)
    [ -z "$m" ] && m=$(grep -hsE '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
        | awk '{print $2}' | grep -v security | head -n1 || true)
    echo "${m:-http://deb.debian.org/debian}"
}

make_base_image() {
    if docker_cli image inspect "$BASE_IMAGE" >/dev/null 2>&1; then return 0; fi
    local debootstrap_bin mirror
    debootstrap_bin=$(command -v debootstrap || echo /usr/sbin/debootstrap)
    mirror=$(debian_mirror)
    ROOTFS=$(mktemp -d "${TMPDIR:-/tmp}/lab-rootfs.XXXXXX")
    trap 'as_root rm -rf "$ROOTFS"' EXIT
    local rootfs=$ROOTFS
    say "making $BASE_IMAGE with debootstrap from $mirror (about 30 s)"
    as_root "$debootstrap_bin" --variant=minbase bookworm "$rootfs" "$mirror" >"$STATE_DIR/debootstrap.log" 2>&1 \
        || { tail -n 20 "$STATE_DIR/debootstrap.log" >&2; die "debootstrap failed (see $STATE_DIR/debootstrap.log)"; }
    as_root rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    as_root tar -C "$rootfs" -c . | docker_cli import --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
    say "made $BASE_IMAGE"
}

mkdir -p "$STATE_DIR"
install_missing
start_engine
make_base_image
