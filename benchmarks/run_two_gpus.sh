#!/usr/bin/env bash
# Issue 15's 2-GPU rows, in two device calls of under 10 minutes each (two H100s or H200s):
#   bash benchmarks/run_two_gpus.sh "$OUT" split      # one GPU, sequence parallel, communication
#                                                     # alone, the stage split (bench_multi_gpu.py)
#   bash benchmarks/run_two_gpus.sh "$OUT" replicas   # requests per minute, 1 and 2 replicas,
#                                                     # a burst of 8 (bench_replicas.py)
# from the repository root on the device machine, with the wheels of .whl/ carried. Each part
# writes its table and JSON into OUT and its whole log to OUT/<part>.log.
set -uo pipefail
out=${1:?give the output folder}
part=${2:?give the part: split or replicas}
mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
nvidia-smi -L | tee "$out/gpus.txt"
case "$part" in
  split)
    timeout 560 python3 -m torch.distributed.run --nproc-per-node 2 benchmarks/bench_multi_gpu.py \
      --compile --rounds 2 --out "$out" > "$out/split.log" 2>&1
    status=$?
    tail -n 30 "$out/multi_gpu.md" 2>/dev/null ;;
  replicas)
    timeout 560 python3 benchmarks/bench_replicas.py --replicas 1,2 --burst 8 --out "$out" \
      > "$out/replicas.log" 2>&1
    status=$?
    tail -n 10 "$out/replicas.md" 2>/dev/null ;;
  *) echo "unknown part $part: split or replicas"; exit 2 ;;
esac
[ "$status" = 0 ] || tail -n 40 "$out/$part.log"
exit "$status"
