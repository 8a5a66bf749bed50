#!/usr/bin/env bash
# Entry point of the worker image: make $RLHF_WORKSPACE a ready git + DVC workspace, then run
# the command (a Prefect worker, `prefect flow-run execute` in a Kubernetes pod, or anything else).
#
# Environment (all optional):
#   RLHF_WORKSPACE         where the flow runs `dvc repro` (prefect.yaml's pull step cds there);
#                          empty: no workspace is prepared
#   RLHF_GIT_URL / _REF    clone this repository (branch or tag) into an empty workspace
#   RLHF_SOURCE_DIR        otherwise seed the workspace from this copy of the project (the
#                          image's /opt/rlhf) as a new one-commit git repository
#   RLHF_DVC_REMOTE_URL    make this the default DVC remote `s3` (in .dvc/config.local)
#   RLHF_DVC_ENDPOINT_URL  S3 endpoint of that remote (MinIO); credentials stay in AWS_* env vars
#   RLHF_DVC_PULL=1        `dvc pull --allow-missing` so stages up to date on the remote are skipped
set -euo pipefail

log() { echo "[rlhf-entrypoint] $*" >&2; }
die() { log "error: $*"; exit 2; }

seed_from_source() {
  local ws="$1" src="${RLHF_SOURCE_DIR:-}"
  [ -n "$src" ] && [ -f "$src/dvc.yaml" ] || die "RLHF_WORKSPACE=$ws has no dvc.yaml and neither RLHF_GIT_URL nor RLHF_SOURCE_DIR (a project copy with dvc.yaml) is set"
  log "seeding $ws from $src (no RLHF_GIT_URL): a new git repository with one commit"
  mkdir -p "$ws"
  cp -R "$src/." "$ws/"
  git -C "$ws" init --quiet
  git -C "$ws" add --all
  git -C "$ws" -c user.name=rlhf-worker -c user.email=rlhf-worker@localhost \
    commit --quiet --message "workspace seeded from $src"
}

clone_repo() {
  local ws="$1"
  local args=(clone --quiet)
  [ -z "${RLHF_GIT_REF:-}" ] || args+=(--branch "$RLHF_GIT_REF")
  log "cloning ${RLHF_GIT_URL}${RLHF_GIT_REF:+ at $RLHF_GIT_REF} into $ws"
  mkdir -p "$(dirname "$ws")"
  git "${args[@]}" "$RLHF_GIT_URL" "$ws"
}

configure_dvc_remote() {
  local ws="$1"
  [ -n "${RLHF_DVC_REMOTE_URL:-}" ] || return 0
  # --local: .dvc/config.local is git-ignored, so the checkout stays clean.
  (cd "$ws" && dvc remote add --local --force --default s3 "$RLHF_DVC_REMOTE_URL" >/dev/null)
  if [ -n "${RLHF_DVC_ENDPOINT_URL:-}" ]; then
    (cd "$ws" && dvc remote modify --local s3 endpointurl "$RLHF_DVC_ENDPOINT_URL")
  fi
  log "DVC remote s3 -> $RLHF_DVC_REMOTE_URL${RLHF_DVC_ENDPOINT_URL:+ (endpoint $RLHF_DVC_ENDPOINT_URL)}"
}

prepare_workspace() {
  local ws="${RLHF_WORKSPACE:-}"
  [ -n "$ws" ] || return 0
  if [ ! -f "$ws/dvc.yaml" ]; then
    if [ -e "$ws" ] && [ -n "$(ls -A "$ws")" ]; then
      die "RLHF_WORKSPACE=$ws is not empty but has no dvc.yaml: refusing to overwrite it"
    fi
    if [ -n "${RLHF_GIT_URL:-}" ]; then clone_repo "$ws"; else seed_from_source "$ws"; fi
  fi
  configure_dvc_remote "$ws"
  if [ "${RLHF_DVC_PULL:-0}" = "1" ]; then
    log "dvc pull --allow-missing in $ws"
    (cd "$ws" && dvc pull --allow-missing)
  fi
}

# A worker without a server would fall back to a temporary local Prefect server and wait forever.
if [ "${1:-}" = "prefect" ] && [ "${2:-}" = "worker" ] && [ -z "${PREFECT_API_URL:-}" ]; then
  die "PREFECT_API_URL is not set: a worker needs the Prefect server's API (e.g. http://prefect-server:4200/api)"
fi
[ "$#" -gt 0 ] || die "no command given"

prepare_workspace
exec "$@"
