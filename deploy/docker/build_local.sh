#!/usr/bin/env bash
# Builds the CPU image (deploy/docker/Dockerfile.cpu, runtime stage) on a machine without a container registry, from
# binaries already built here, and runs the arith-r1 demo in it:
#
#   1. a Debian bookworm base made with debootstrap from the configured Debian mirror (no registry pull), imported
#      under the name the Dockerfile's FROM uses;
#   2. `podman build --build-arg BINARIES=prebuilt` on a staged context holding the stripped target/release binaries
#      and $R1_HOME/lib (no compiler in the image build);
#   3. exports tests/fixtures/arith-r1 with target/release/r1-export, then in the container: `r1-export build --target
#      cpu` (what the Helm chart's init container runs), `r1-serve generate`, and the server: GET /health, an OpenAI
#      chat completion, SIGTERM and a clean drain;
#   4. prints the image size.
#
# Usage: deploy/docker/build_local.sh    (root; needs target/release/r1-serve and r1-export: cargo build --release)
# Env: R1_IMAGE (default localhost/r1-serve:cpu-local), R1_LOCAL_WORK (default /tmp/r1-image-build), DEBIAN_MIRROR.
# Installs podman, runc and debootstrap from Debian's packages when they are missing.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
source "$ROOT/scripts/lib.sh"
IMAGE="${R1_IMAGE:-localhost/r1-serve:cpu-local}"
WORK="${R1_LOCAL_WORK:-/tmp/r1-image-build}"
BASE="docker.io/library/debian:bookworm-slim" # the name Dockerfile.cpu's runtime stage starts FROM
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
BIN="$(r1_target_dir)/release"
say() { printf '[build_local] %s\n' "$*" >&2; }
die() { printf '[build_local] error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (rootful podman, debootstrap)"
for b in r1-serve r1-export r1-bench; do
  [ -x "$BIN/$b" ] || die "$BIN/$b is missing: cargo build --release -p r1-serve -p r1-export"
done
ls "$R1_HOME"/lib/libonnxruntime.so.* >/dev/null 2>&1 || die "no ONNX Runtime in $R1_HOME/lib: run scripts/setup.sh"
missing=()
for tool in podman:podman runc:runc debootstrap:debootstrap; do
  command -v "${tool%%:*}" >/dev/null || missing+=("${tool#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]} from Debian's packages"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# This kind of machine (a VM whose cgroups are mounted v1+v2 "hybrid", no CAP_SYS_RESOURCE) needs: runc (crun
# refuses hybrid cgroups), and rlimits at or below what the container init may set (podman's defaults raise
# RLIMIT_NPROC/NOFILE, which fails with EPERM). Host networking: no CNI/netavark setup needed.
PODMAN=(podman --runtime runc)
RUNOPTS=(--ulimit nofile=16384:16384 --ulimit nproc=4096:4096 --network host)

mkdir -p "$WORK"
if ! podman image exists "$BASE"; then
  if [ ! -x "$WORK/rootfs/bin/bash" ]; then
    say "debootstrap bookworm (minbase) from $MIRROR"
    rm -rf "$WORK/rootfs"
    debootstrap --variant=minbase bookworm "$WORK/rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
      || { tail -20 "$WORK/debootstrap.log" >&2; die "debootstrap failed"; }
  fi
  # What the registry's debian:bookworm-slim does too: apt keeps no package caches, dpkg installs no docs or man pages.
  R="$WORK/rootfs"
  cat >"$R/etc/apt/apt.conf.d/docker-clean" <<'CONF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
CONF
  printf '%s\n' 'path-exclude /usr/share/doc/*' 'path-include /usr/share/doc/*/copyright' \
    'path-exclude /usr/share/man/*' 'path-exclude /usr/share/info/*' 'path-exclude /usr/share/locale/*' \
    >"$R/etc/dpkg/dpkg.cfg.d/docker-slim"
  rm -rf "$R/var/cache/apt/archives"/*.deb "$R/var/cache/apt"/*.bin "$R/var/lib/apt/lists"/* \
    "$R/usr/share/man"/* "$R/usr/share/info"/* "$R/usr/share/locale"/*
  find "$R/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
  say "importing the rootfs as $BASE"
  tar -C "$WORK/rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - "$BASE" >/dev/null
fi

say "staging the build context (stripped binaries, ONNX Runtime library, entrypoint)"
CTX="$WORK/context"
rm -rf "$CTX" && mkdir -p "$CTX/target/release" "$CTX/.r1/lib" "$CTX/deploy/docker"
for b in r1-serve r1-export r1-bench; do strip -o "$CTX/target/release/$b" "$BIN/$b"; done
cp -a "$R1_HOME"/lib/. "$CTX/.r1/lib/"
cp "$ROOT/deploy/docker/entrypoint.sh" "$CTX/deploy/docker/"

say "podman build -f deploy/docker/Dockerfile.cpu --build-arg BINARIES=prebuilt -t $IMAGE"
t0=$(date +%s)
"${PODMAN[@]}" build --pull=never "${RUNOPTS[@]}" --build-arg BINARIES=prebuilt \
  -f "$ROOT/deploy/docker/Dockerfile.cpu" -t "$IMAGE" "$CTX"
say "built in $(( $(date +%s) - t0 )) s"

say "exporting tests/fixtures/arith-r1 (fp32) for the demo"
ART="$WORK/arith-r1"
rm -rf "$ART"
"$BIN/r1-export" "$ROOT/tests/fixtures/arith-r1" -o "$ART" --quiet
chown -R 10001:10001 "$ART" # the image runs as uid 10001; the engine build writes into the artifact

run() { "${PODMAN[@]}" run --rm "${RUNOPTS[@]}" "$@"; }
say "in the container: r1-export build /models/model --target cpu (the chart's init container)"
run -v "$ART:/models/model" "$IMAGE" r1-export build /models/model --target cpu
say "in the container: the same build again (a no-op or a rebuild, never a failure)"
run -v "$ART:/models/model" "$IMAGE" r1-export build /models/model --target cpu
say "in the container: r1-serve generate"
run -v "$ART:/models/model:ro" "$IMAGE" r1-serve generate --model /models/model --backend ort --max-tokens 8 "What is 1+1?"

say "in the container: the server (read-only model mount), /health, a chat completion, SIGTERM"
GRPC_PORT=51051 HTTP_PORT=18080
NAME="r1-build-local-$$"
"${PODMAN[@]}" run -d --name "$NAME" "${RUNOPTS[@]}" --read-only -v "$ART:/models/model:ro" \
  -e R1_GRPC_ADDR=127.0.0.1:$GRPC_PORT -e R1_HTTP_ADDR=127.0.0.1:$HTTP_PORT -e R1_DRAIN_TIMEOUT_SECS=5 \
  -e R1_MODEL_ID=arith-r1 "$IMAGE" >/dev/null
trap '"${PODMAN[@]}" rm -f "$NAME" >/dev/null 2>&1 || true' EXIT
ready=""
for _ in $(seq 1 120); do
  if curl -fsS "http://127.0.0.1:$HTTP_PORT/health" >/dev/null 2>&1; then ready=1; break; fi
  sleep 0.5
done
[ -n "$ready" ] || { podman logs "$NAME" >&2; die "the server never became ready"; }
curl -fsS "http://127.0.0.1:$HTTP_PORT/health"
curl -fsS "http://127.0.0.1:$HTTP_PORT/v1/chat/completions" -H 'content-type: application/json' \
  -d '{"model":"arith-r1","messages":[{"role":"user","content":"What is 1+1?"}],"max_tokens":16,"temperature":0}'
echo
say "in a second container: r1-bench (the load generator deploy/README.md uses to check autoscaling)"
run "$IMAGE" r1-bench --addr "http://127.0.0.1:$GRPC_PORT" -n 32 -c 8 --max-tokens 16 --prompt-tokens 16
curl -fsS "http://127.0.0.1:$HTTP_PORT/metrics" | grep -E '^r1_(queue_depth|kv_blocks|running_sequences)' >&2
t0=$(date +%s%N)
podman stop -t 30 "$NAME" >/dev/null
code=$(podman inspect "$NAME" --format '{{.State.ExitCode}}')
say "stopped (SIGTERM) in $(( ($(date +%s%N) - t0) / 1000000 )) ms, exit code $code"
podman logs "$NAME" 2>&1 | grep -E "SIGTERM|draining|stopped" >&2 || true
[ "$code" = 0 ] || die "the server did not exit cleanly on SIGTERM"

size=$(podman image inspect "$IMAGE" --format '{{.Size}}')
say "image $IMAGE: $(( size / 1000000 )) MB ($size bytes); layers:"
podman history --format '{{.Size}}\t{{.CreatedBy}}' "$IMAGE" | cut -c1-110 >&2
