#!/usr/bin/env bash
# Build the mcp-rag container image on this machine and run it, end to end.
#
# This is a manual smoke test of the deployment image, not part of CI: it takes several
# minutes and needs root (debootstrap, buildah and podman with the vfs storage driver).
# It uses no registry other than Debian's mirror and PyPI:
#
#   1. base   - debootstrap a minimal Debian bookworm rootfs, add Debian's Python 3.11
#               (python3.11 + python3-venv) and import it as a local base image. This
#               stands in for python:3.11-slim-bookworm, which we cannot pull here.
#   2. build  - buildah bud of the repository's Containerfile with BASE_IMAGE pointing at
#               that base (docker image format, so that HEALTHCHECK is kept).
#   3. run    - podman run of the image like production would: read-only root, /tmp as
#               tmpfs, /var/lib/mcp-rag as a volume, 1 GiB / 1 CPU, an API key, no
#               external services (embedded Postgres and embedded index under
#               /var/lib/mcp-rag). Then: GET /health and /ready, the image HEALTHCHECK,
#               one MCP tool call over streamable HTTP with the bearer token, and a
#               SIGTERM (podman stop -t 30) whose exit code and duration are checked.
#
# Usage: deploy/image/build-and-run.sh [--steps base,build,run] [--rebuild-base] [--keep]
#   --steps         which steps to run, comma separated (default: base,build,run)
#   --rebuild-base  debootstrap the base again even if the base image exists
#   --keep          leave the container and its volume behind after the run
#
# Environment overrides: WORK_DIR (default /var/tmp/mcp-rag-image), BASE_IMAGE, IMAGE,
# DEBIAN_MIRROR, HOST_PORT (default 18000), LOG_FILE.
#
# Everything shown is also appended to $LOG_FILE (default $WORK_DIR/build-and-run.log);
# docs/deploy.md quotes a run of it.
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
WORK_DIR=${WORK_DIR:-/var/tmp/mcp-rag-image}
BASE_IMAGE=${BASE_IMAGE:-localhost/mcp-rag-base:bookworm-py311}
IMAGE=${IMAGE:-localhost/mcp-rag/api:dev}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
HOST_PORT=${HOST_PORT:-18000}
LOG_FILE=${LOG_FILE:-$WORK_DIR/build-and-run.log}
CONTAINER=mcp-rag-smoke
VOLUME=mcp-rag-smoke-data
# A throwaway token for this local run only (>= 16 characters, as the server requires).
SMOKE_TOKEN=smoke-test-token-0123456789abcdef

STEPS=base,build,run
REBUILD_BASE=0
KEEP=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --steps) STEPS=$2; shift 2 ;;
        --steps=*) STEPS=${1#--steps=}; shift ;;
        --rebuild-base) REBUILD_BASE=1; shift ;;
        --keep) KEEP=1; shift ;;
        -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done

if [[ $(id -u) -ne 0 ]]; then
    echo "this script needs root (debootstrap, buildah and podman with vfs storage)" >&2
    exit 1
fi

mkdir -p "$WORK_DIR"
# Common flags: vfs storage (no overlayfs needed), runc and cgroupfs (no systemd here).
PODMAN=(podman --storage-driver vfs --runtime runc --cgroup-manager cgroupfs)
BUILDAH=(buildah --storage-driver vfs)
# Podman's default RLIMIT_NOFILE (1048576) is more than this sandbox lets runc set.
LIMITS=(--ulimit nofile=1024:1024 --ulimit nproc=4096:4096)

log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*" | tee -a "$LOG_FILE" >&2; }
# Run a command, show it and its output, keep its exit code.
run() {
    log "\$ $*"
    local rc=0
    "$@" 2>&1 | tee -a "$LOG_FILE" || rc=${PIPESTATUS[0]}
    return "$rc"
}
step_wanted() { [[ ",$STEPS," == *",$1,"* ]]; }
image_id() { "${PODMAN[@]}" image inspect -f '{{.Id}}' "$1" 2>/dev/null || true; }
# drop_if_untagged ID: a rebuild moves the tag; remove the previous image (vfs keeps full copies).
drop_if_untagged() {
    [[ -n $1 ]] || return 0
    if [[ $("${PODMAN[@]}" image inspect -f '{{len .RepoTags}}' "$1" 2>/dev/null) == 0 ]]; then
        "${PODMAN[@]}" rmi "$1" >/dev/null 2>&1 && log "removed the previous, now untagged image ${1:0:12}" || true
    fi
}
die() { log "FAILED: $*"; exit 1; }

ensure_host_tools() {
    local missing=()
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    command -v buildah >/dev/null || missing+=(buildah)
    command -v podman >/dev/null || missing+=(podman)
    command -v runc >/dev/null || missing+=(runc)
    command -v curl >/dev/null || missing+=(curl)
    if ((${#missing[@]})); then
        log "installing host tools: ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" containernetworking-plugins >/dev/null
    fi
}

# ---------------------------------------------------------------------------------------
# 1. base image: Debian bookworm minbase + Debian's Python 3.11
# ---------------------------------------------------------------------------------------
build_base() {
    if [[ $REBUILD_BASE -eq 0 ]] && "${PODMAN[@]}" image exists "$BASE_IMAGE"; then
        log "base image $BASE_IMAGE exists (use --rebuild-base to rebuild it)"
        return
    fi
    local rootfs=$WORK_DIR/rootfs previous
    previous=$(image_id "$BASE_IMAGE")
    rm -rf "$rootfs"
    local start=$SECONDS
    log "\$ debootstrap --variant=minbase --include=python3.11,python3.11-venv,python3-venv,ca-certificates bookworm $rootfs $DEBIAN_MIRROR"
    debootstrap --variant=minbase \
        --include=python3.11,python3.11-venv,python3-venv,ca-certificates \
        bookworm "$rootfs" "$DEBIAN_MIRROR" >"$WORK_DIR/debootstrap.log" 2>&1 ||
        die "debootstrap (see $WORK_DIR/debootstrap.log)"
    log "debootstrap: $(grep -c '^I: Unpacking' "$WORK_DIR/debootstrap.log" || true) packages unpacked ($WORK_DIR/debootstrap.log)"
    # Same suites as the official images: point releases and security updates.
    cat >"$rootfs/etc/apt/sources.list" <<EOF
deb $DEBIAN_MIRROR bookworm main
deb $DEBIAN_MIRROR bookworm-updates main
deb ${DEBIAN_MIRROR%/debian}/debian-security bookworm-security main
EOF
    cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
    log "\$ chroot $rootfs apt-get update && apt-get upgrade"
    chroot "$rootfs" sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get -y upgrade' \
        >"$WORK_DIR/base-upgrade.log" 2>&1 || die "upgrade of the base (see $WORK_DIR/base-upgrade.log)"
    log "upgrade: $(grep -E '^[0-9]+ upgraded' "$WORK_DIR/base-upgrade.log" || echo 'see base-upgrade.log')"
    # Keep it slim: no apt lists, caches, docs or man pages.
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
        "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
        "$rootfs"/var/log/*.log "$rootfs"/var/log/apt/* "$rootfs"/etc/resolv.conf
    : >"$rootfs/etc/resolv.conf"
    run tar -C "$rootfs" --numeric-owner -cf "$WORK_DIR/base.tar" . || die "tar of the base rootfs"
    run "${PODMAN[@]}" import \
        --change 'ENV LANG=C.UTF-8' \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["python3"]' \
        "$WORK_DIR/base.tar" "$BASE_IMAGE" || die "podman import of the base"
    rm -f "$WORK_DIR/base.tar"
    rm -rf "$rootfs"
    drop_if_untagged "$previous"
    run "${PODMAN[@]}" run --rm "${LIMITS[@]}" --network none "$BASE_IMAGE" python3 -c \
        'import sys, ssl, venv; print("base python", sys.version.split()[0], ssl.OPENSSL_VERSION)' ||
        die "the base image cannot run python3"
    log "base image $BASE_IMAGE built in $((SECONDS - start)) s"
}

# ---------------------------------------------------------------------------------------
# 2. application image from the Containerfile
# ---------------------------------------------------------------------------------------
build_image() {
    local start=$SECONDS version revision f previous
    previous=$(image_id "$IMAGE")
    for f in pyproject.toml README.md mcp_rag/__init__.py Containerfile; do
        [[ -e $REPO_ROOT/$f ]] || die "$REPO_ROOT/$f is missing: the image build needs it"
    done
    version=$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$REPO_ROOT/pyproject.toml" | head -n1)
    # The commit, read from .git without running git (a detached HEAD holds the hash).
    revision=$(sed 's/^ref: //' "$REPO_ROOT/.git/HEAD" 2>/dev/null || true)
    if [[ -n $revision && -f $REPO_ROOT/.git/$revision ]]; then
        revision=$(cat "$REPO_ROOT/.git/$revision")
    fi
    # --network host: RUN steps reach Debian's mirror and PyPI through the host.
    # The host CA bundle is bind-mounted for RUN steps so that pip and apt trust the same
    # certificates as the host does.
    run "${BUILDAH[@]}" bud \
        --isolation chroot --network host --pull=never --format docker \
        --build-arg "BASE_IMAGE=$BASE_IMAGE" \
        --build-arg "VERSION=${version:-0.0.0}" \
        --build-arg "REVISION=${revision:-unknown}" \
        --build-arg "CREATED=$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
        -v /etc/ssl/certs:/etc/ssl/certs:ro \
        -f "$REPO_ROOT/Containerfile" -t "$IMAGE" "$REPO_ROOT" || die "image build"
    log "image $IMAGE built in $((SECONDS - start)) s"
    drop_if_untagged "$previous"
    run "${PODMAN[@]}" image inspect --format \
        'size={{.Size}} user={{.Config.User}} entrypoint={{.Config.Entrypoint}} cmd={{.Config.Cmd}} healthcheck={{.Config.Healthcheck}}' \
        "$IMAGE" || true
}

# ---------------------------------------------------------------------------------------
# 3. run it like production would
# ---------------------------------------------------------------------------------------
cleanup_container() {
    "${PODMAN[@]}" rm -f -t 0 "$CONTAINER" >/dev/null 2>&1 || true
    "${PODMAN[@]}" volume rm -f "$VOLUME" >/dev/null 2>&1 || true
}

# http_status PATH BODYFILE -> prints the status code (000 when nothing answers)
http_status() {
    curl -s -o "$2" -w '%{http_code}' --max-time 5 "http://127.0.0.1:$HOST_PORT$1" || true
}

# jsonrpc_of FILE [FIELD] -> the JSON-RPC message of a streamable HTTP answer (plain JSON or
# server-sent events), or one dotted field of it (e.g. result.protocolVersion).
jsonrpc_of() {
    python3 - "$@" <<'PY'
import json, sys
raw = open(sys.argv[1], encoding="utf-8").read()
message = None
for line in raw.splitlines():
    if line.startswith("data:") and line[5:].strip():
        message = json.loads(line[5:])
if message is None and raw.strip():
    message = json.loads(raw)
if len(sys.argv) > 2:
    for part in sys.argv[2].split("."):
        message = message[part]
print(message if isinstance(message, (str, bool, int, float)) else json.dumps(message, separators=(",", ":")))
PY
}

short() { # short TEXT: at most 400 characters, for the log
    local text=$1
    ((${#text} > 400)) && text="${text:0:400}..."
    printf '%s' "$text"
}

# mcp_post OUTFILE BODY [extra curl args...] -> prints the HTTP status
mcp_post() {
    local out=$1 body=$2
    shift 2
    curl -sS --max-time 120 -D "$out.headers" -o "$out" -w '%{http_code}' \
        -H "Authorization: Bearer $SMOKE_TOKEN" \
        -H 'Accept: application/json, text/event-stream' \
        -H 'Content-Type: application/json' \
        "$@" --data "$body" "http://127.0.0.1:$HOST_PORT/mcp"
}

# mcp_tool ID NAME ARGUMENTS_JSON: tools/call, logged; fails unless it returned a result.
MCP_HEADERS=()
mcp_tool() {
    local id=$1 name=$2 arguments=$3 code message
    code=$(mcp_post "$WORK_DIR/call-$id.out" \
        "{\"jsonrpc\":\"2.0\",\"id\":$id,\"method\":\"tools/call\",\"params\":{\"name\":\"$name\",\"arguments\":$arguments}}" \
        "${MCP_HEADERS[@]}")
    message=$(jsonrpc_of "$WORK_DIR/call-$id.out" result.structuredContent 2>/dev/null ||
        jsonrpc_of "$WORK_DIR/call-$id.out" 2>/dev/null || true)
    log "tools/call $name -> HTTP $code: $(short "$message")"
    [[ $code == 200 ]] || die "tools/call $name failed"
    [[ $(jsonrpc_of "$WORK_DIR/call-$id.out" result.isError 2>/dev/null) == False ]] ||
        die "tools/call $name returned an error"
}

start_container() { # start_container NETWORK-ARGS...
    "${PODMAN[@]}" rm -f -t 0 "$CONTAINER" >/dev/null 2>&1 || true
    run "${PODMAN[@]}" run -d --name "$CONTAINER" \
        --read-only \
        --tmpfs /tmp:rw,nosuid,nodev,size=512m,mode=1777 \
        -v "$VOLUME:/var/lib/mcp-rag:U" \
        --memory 1g --cpus 1 \
        "${LIMITS[@]}" \
        --cap-drop ALL --security-opt no-new-privileges \
        --health-interval disable \
        -e "MCP_RAG_API_KEYS=[{\"token\": \"$SMOKE_TOKEN\", \"tenant\": \"smoke\", \"scopes\": [\"read\", \"write\"]}]" \
        -e 'MCP_RAG_ALLOWED_HOSTS=127.0.0.1:*,localhost:*' \
        -e MCP_RAG_STATELESS_HTTP=true \
        -e MCP_RAG_REGION=local-smoke \
        "$@" \
        "$IMAGE"
}

run_container() {
    cleanup_container
    [[ $KEEP -eq 1 ]] || trap cleanup_container EXIT
    "${PODMAN[@]}" image exists "$IMAGE" || die "image $IMAGE is missing: run the build step first"
    "${PODMAN[@]}" volume create "$VOLUME" >/dev/null

    # No MCP_RAG_DATABASE_URL / MCP_RAG_QDRANT_URL: the embedded Postgres and the embedded
    # index live in the volume. Rootful port publishing needs netavark + iptables; where the
    # sandbox refuses that, fall back to the host network with the server on 127.0.0.1.
    local start=$SECONDS
    if ! start_container -p "127.0.0.1:$HOST_PORT:8000"; then
        log "port publishing failed here; using --network host"
        start_container --network host -e MCP_RAG_HOST=127.0.0.1 -e "MCP_RAG_PORT=$HOST_PORT" ||
            die "podman run"
    fi

    # Wait for readiness: initdb of the embedded Postgres and the model load take a while.
    local health=000 ready=000
    for _ in $(seq 1 240); do
        if [[ $("${PODMAN[@]}" inspect -f '{{.State.Running}}' "$CONTAINER" 2>/dev/null) != true ]]; then
            run "${PODMAN[@]}" logs "$CONTAINER" || true
            die "the container exited during start-up"
        fi
        ready=$(http_status /ready "$WORK_DIR/ready.body")
        [[ $ready == 200 ]] && break
        sleep 1
    done
    health=$(http_status /health "$WORK_DIR/health.body")
    log "after $((SECONDS - start)) s: GET /health -> $health $(cat "$WORK_DIR/health.body")"
    log "                GET /ready  -> $ready $(cat "$WORK_DIR/ready.body")"
    [[ $health == 200 && $ready == 200 ]] || {
        run "${PODMAN[@]}" logs --tail 50 "$CONTAINER" || true
        die "/health or /ready did not answer 200"
    }
    # The image's own HEALTHCHECK (python urllib), run by hand: there is no systemd timer.
    if run "${PODMAN[@]}" healthcheck run "$CONTAINER"; then
        log "image HEALTHCHECK: healthy"
    else
        die "image HEALTHCHECK failed"
    fi

    # MCP over streamable HTTP: initialize, initialized, then tool calls.
    local code session version
    code=$(mcp_post "$WORK_DIR/init.out" \
        '{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"build-and-run.sh","version":"1"}}}')
    log "initialize -> HTTP $code: $(short "$(jsonrpc_of "$WORK_DIR/init.out" 2>/dev/null || true)")"
    [[ $code == 200 ]] || die "initialize failed"
    session=$(tr -d '\r' <"$WORK_DIR/init.out.headers" | sed -n 's/^[Mm][Cc][Pp]-[Ss]ession-[Ii][Dd]: *//p')
    version=$(jsonrpc_of "$WORK_DIR/init.out" result.protocolVersion)
    MCP_HEADERS=(-H "MCP-Protocol-Version: $version")
    [[ -n $session ]] && MCP_HEADERS+=(-H "Mcp-Session-Id: $session")
    log "negotiated protocol $version, session ${session:-none (stateless HTTP)}"
    code=$(mcp_post "$WORK_DIR/notif.out" '{"jsonrpc":"2.0","method":"notifications/initialized"}' "${MCP_HEADERS[@]}")
    log "notifications/initialized -> HTTP $code"
    mcp_tool 2 stats '{}'
    # Beyond the one required call: write and read back through Postgres, the embedding
    # model and the index, all inside the read-only container.
    mcp_tool 3 ingest_text \
        '{"text":"Kubernetes sends SIGTERM, waits for the grace period, then SIGKILL.","title":"shutdown note"}'
    mcp_tool 4 search '{"query":"what happens after the grace period?","top_k":1}'
    # Without the token the same endpoint must refuse.
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 10 \
        -H 'Accept: application/json, text/event-stream' -H 'Content-Type: application/json' \
        --data '{"jsonrpc":"2.0","id":5,"method":"tools/list"}' "http://127.0.0.1:$HOST_PORT/mcp" || true)
    log "tools/list without a bearer token -> HTTP $code"
    [[ $code == 401 ]] || die "an unauthenticated request was not refused"

    run "${PODMAN[@]}" stats --no-stream --format 'mem={{.MemUsage}} cpu={{.CPUPerc}} pids={{.PIDs}}' "$CONTAINER" || true

    # Graceful shutdown: SIGTERM, then up to 30 s before podman would SIGKILL.
    local t0 t1 exit_code
    t0=$(date +%s.%N)
    run "${PODMAN[@]}" stop -t 30 "$CONTAINER" >/dev/null || die "podman stop"
    t1=$(date +%s.%N)
    exit_code=$("${PODMAN[@]}" inspect -f '{{.State.ExitCode}}' "$CONTAINER")
    log "podman stop -t 30 (SIGTERM) took $(python3 -c "print(f'{$t1 - $t0:.1f}')") s, exit code $exit_code"
    run "${PODMAN[@]}" logs --tail 12 "$CONTAINER" || true
    [[ $exit_code == 0 ]] || die "the server did not exit 0 on SIGTERM"
    log "smoke run passed"
}

: >>"$LOG_FILE"
log "build-and-run.sh: steps=$STEPS repo=$REPO_ROOT base=$BASE_IMAGE image=$IMAGE"
ensure_host_tools
step_wanted base && build_base
step_wanted build && build_image
step_wanted run && run_container
log "done (log: $LOG_FILE)"
