#!/usr/bin/env bash
# The GPU checks, as one script for a machine with a CUDA device (Python 3.12, torch 2.11
# there, no network).  Phases, in the order given (default: all of them):
#
#   tests    pytest -m gpu, and the transformers TrainerCallback test          (~1 min)
#   fsdp     examples/train_fsdp.py under torchrun on one GPU, then resumed     (~1 min)
#   stall    benchmarks/stall.py, ~1 B params + AdamW, every method              (~8 min)
#   restore  benchmarks/restore.py on the same size                            (~4 min)
#
#   bash benchmarks/gpu_suite.sh tests fsdp        # then, in a second call:  stall;  restore
#
# Wheels the machine lacks travel in .whl/ (ignored by git), fetched here with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux2014_x86_64 -d .whl \
#     zstandard torchdata==0.11.0 torch-checkpointing==0.1.1 torchsnapshot==0.1.0 \
#     importlib-metadata==8.7.0 nest-asyncio
# Logs and results go to $OUT (or benchmarks/out).  PARAMS overrides the model size.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/out}
mkdir -p "$out"
params=${PARAMS:-1e9}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__)"
  df -h /tmp | tail -1; } 2>&1 | tee "$out/env.txt"

status=0
run() {  # run NAME COMMAND...: log to $out/NAME.log, remember a failure, go on
    local name=$1; shift
    echo "== $name: $*"
    "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc"
    [ "$rc" -eq 0 ] || status=1
}

for phase in "${@:-tests fsdp stall restore}"; do
    for p in $phase; do
        case $p in
            tests)   run tests python3 -m pytest -m gpu -q -p no:cacheprovider tests
                     run hf python3 -m pytest -q -p no:cacheprovider tests/test_integrations_hf.py ;;
            fsdp)    rm -rf /tmp/fsdp-ckpt
                     run fsdp bash -c "torchrun --standalone --nproc_per_node=1 examples/train_fsdp.py \
                         --root /tmp/fsdp-ckpt --steps 20 --every 10 && \
                         torchrun --standalone --nproc_per_node=1 examples/train_fsdp.py \
                         --root /tmp/fsdp-ckpt --steps 30 --every 10" ;;
            stall)   run stall python3 benchmarks/stall.py --params "$params" --saves 3 --out "$out" ;;
            restore) run restore python3 benchmarks/restore.py --params "$params" --repeat 2 --out "$out" ;;
            *)       echo "unknown phase: $p (tests, fsdp, stall, restore)"; exit 2 ;;
        esac
    done
done
exit $status
