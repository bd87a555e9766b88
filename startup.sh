#!/usr/bin/env bash
# Production entry (RunPod): check the environment, prepare directories, report the machine, then
# `exec python -m orchestrator` (which starts and supervises the whole fleet), under tini when it is installed.
#
#   ./startup.sh            check, prepare, report, exec the orchestrator
#   ./startup.sh --check    the same, without exec (exit 0 when everything needed is set)
#
# Variables: PYTHON (default python3), FLEET_BASE_DIR (default /workspace/fleet when /workspace is writable,
# else ./var) holding hf/ (HF_HOME), tmp/ (TMPDIR), logs/ (LOG_DIR) and inductor/ (TORCHINDUCTOR_CACHE_DIR)
# unless those are set already.
# It never prints a secret's value, only variable names.
# Zombies: in a container this script's pid is PID 1, and every orphaned process of the fleet (a gunicorn worker
# whose master was SIGKILLed) is re-parented to it. With tini on PATH, tini becomes that process (`-s`: a child
# subreaper too when it is not PID 1) and reaps them; without it the orchestrator reaps them itself (it makes
# itself a child subreaper, see orchestrator/reaper.py). Either way signals reach the orchestrator.
set -euo pipefail

cd "$(dirname "$(readlink -f "$0")")"
PYTHON="${PYTHON:-python3}"
check_only=0
case "${1:-}" in
  --check) check_only=1 ;;
  "") ;;
  *) echo "usage: $0 [--check]" >&2; exit 64 ;;
esac

say() { printf 'startup: %s\n' "$*"; }
warn() { printf 'startup: WARNING: %s\n' "$*"; }
is_set() { [ -n "${!1:-}" ]; }

# --- Python ---------------------------------------------------------------------------------------------
if ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "startup: ERROR: $PYTHON not found (install Python 3.11+ or set PYTHON)" >&2
  exit 1
fi
if ! "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
  echo "startup: ERROR: $PYTHON is older than Python 3.11" >&2
  exit 1
fi
say "python: $("$PYTHON" -c 'import sys; print(sys.version.split()[0])') ($(command -v "$PYTHON"))"

# --- required variables (names only) --------------------------------------------------------------------
missing=()
is_set SUPABASE_URL || missing+=("SUPABASE_URL")
is_set SUPABASE_SERVICE_KEY || is_set SUPABASE_SERVICE_ROLE_KEY \
  || missing+=("SUPABASE_SERVICE_KEY (or SUPABASE_SERVICE_ROLE_KEY)")
is_set JOB_CALLBACK_SECRET || missing+=("JOB_CALLBACK_SECRET")
if ! is_set REDIS_URL && ! { is_set UPSTASH_REDIS_REST_URL && is_set UPSTASH_REDIS_REST_TOKEN; }; then
  missing+=("REDIS_URL (or UPSTASH_REDIS_REST_URL and UPSTASH_REDIS_REST_TOKEN)")
fi
is_set WORKER_ADMIN_KEY || missing+=("WORKER_ADMIN_KEY")

programs=",${FLEET_PROGRAMS:-memory_manager,router,registration,sdxl,chat,wan},"
programs="${programs// /}"
listed=0
model_workers=0
for worker in sdxl chat wan; do
  case "$programs" in *",$worker,"*) ;; *) continue ;; esac
  listed=$((listed + 1))
  case "$worker" in
    sdxl) names="SDXL_MODEL_PATH" ;;
    chat) names="QWEN_INSTRUCT_PATH QWEN_BASE_PATH" ;;
    wan) names="WAN_MODEL_PATH" ;;
  esac
  found=0
  for name in $names; do
    if is_set "$name"; then
      found=1
      [ -e "${!name}" ] || warn "$name is set but does not exist on this machine"
    fi
  done
  if [ "$found" = 1 ]; then
    model_workers=$((model_workers + 1))
  else
    warn "$worker: ${names// / or } not set: the orchestrator skips the $worker worker"
  fi
done
if [ "$listed" -gt 0 ] && [ "$model_workers" = 0 ]; then
  missing+=("a model path (SDXL_MODEL_PATH, QWEN_INSTRUCT_PATH / QWEN_BASE_PATH or WAN_MODEL_PATH)")
fi
if [ "${#missing[@]}" -gt 0 ]; then
  echo "startup: ERROR: required settings are missing:" >&2
  for name in "${missing[@]}"; do echo "  - $name" >&2; done
  exit 1
fi
is_set RUNPOD_POD_ID || is_set PUBLIC_BASE_URL \
  || warn "neither RUNPOD_POD_ID nor PUBLIC_BASE_URL is set: the workers will not register with the app"

# --- directories ----------------------------------------------------------------------------------------
if [ -z "${FLEET_BASE_DIR:-}" ]; then
  if [ -d /workspace ] && [ -w /workspace ]; then FLEET_BASE_DIR=/workspace/fleet; else FLEET_BASE_DIR="$PWD/var"; fi
fi
export FLEET_BASE_DIR
export HF_HOME="${HF_HOME:-$FLEET_BASE_DIR/hf}"
export TMPDIR="${TMPDIR:-$FLEET_BASE_DIR/tmp}"
export LOG_DIR="${LOG_DIR:-$FLEET_BASE_DIR/logs}"
# torch.compile's kernels survive restarts here (COMPILE_BLOCKS, on by default: ~15 s of the first start; TORCH_COMPILE=true: minutes per shape).
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$FLEET_BASE_DIR/inductor}"
mkdir -p "$HF_HOME" "$TMPDIR" "$LOG_DIR" "$TORCHINDUCTOR_CACHE_DIR"
say "directories: HF_HOME=$HF_HOME TMPDIR=$TMPDIR LOG_DIR=$LOG_DIR TORCHINDUCTOR_CACHE_DIR=$TORCHINDUCTOR_CACHE_DIR"

# --- machine report -------------------------------------------------------------------------------------
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=index,name,memory.total,memory.free,driver_version --format=csv,noheader \
    | sed 's/^/startup: GPU /' || warn "nvidia-smi did not answer"
else
  warn "nvidia-smi not found: no NVIDIA GPU visible, the model workers run on CPU"
fi
df -h "$FLEET_BASE_DIR" | sed -n '2p' | awk '{print "startup: disk at base dir: " $4 " free of " $2}'

# --- models load offline, from the paths above ----------------------------------------------------------
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export PYTHONUNBUFFERED=1
say "offline mode: HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1"

if [ "$check_only" = 1 ]; then
  say "check passed"
  exit 0
fi
if command -v tini >/dev/null 2>&1; then
  say "exec tini -s -- $PYTHON -m orchestrator (tini reaps orphaned processes)"
  exec tini -s -- "$PYTHON" -m orchestrator
fi
say "exec $PYTHON -m orchestrator (no tini: the orchestrator reaps orphaned processes itself)"
exec "$PYTHON" -m orchestrator
