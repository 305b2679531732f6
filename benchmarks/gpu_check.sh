#!/usr/bin/env bash
# The suite's GPU check, one command on a GPU machine without network (issue 13), most
# important first, so that a machine taken back early has already measured those:
#   1. benchmarks/bench_inner_kernel.py: the fused Triton inner block alone, its tile sizes
#      swept against the PyTorch block (issue 18);
#   2. benchmarks/bench_tnt_speed.py --batch-size 128 --dtypes bf16 --compile, with the Triton
#      rows (--inner-kernel torch,triton) on the sweep's best tiles (issue 18's targets);
#   3. benchmarks/profile_tnt_step.py: where TNT-S's bf16 training step spends its GPU time
#      with the kernel (what is left between it and DeiT-S per FLOP);
#   4. benchmarks/bench_matrix_workers.py on the machine's CPU cores: 2 workers against one
#      process (issue 17's wall-time target needs cores that scale, which this box has);
#   5. a 2-epoch tracked tntbench train on synthetic CIFAR-sized data (MLflow system metrics,
#      the GPU's included), as the default run goes (train.compile = auto: compiled on CUDA);
#   6. tntbench profile, train and infer, bf16, for TNT-S and DeiT-S;
#   7. benchmarks/bench_data.py (issue 23): the input pipeline on an ImageNet-like JPEG folder
#      it makes, today's against the uint8 one, per core and with 6 workers; the GPU pipeline
#      (nvJPEG + v2 transforms on CUDA); tntbench train of TNT-S and DeiT-S on the folder
#      against synthetic data (eager, 2 epochs; 4,096 JPEGs, 2,048 synthetic images);
#   8. the CUDA tests (tests/test_cuda.py).
# Each step is bounded by a timeout (together 675 s: with the wheel install the whole check
# runs past one 10-minute device call, so there run it as two, the second with
# --only bench_data,cuda_tests); a step that fails or times out is
# recorded and the rest still run. Results go to reports/gpu/<device>/: each step's log, JSON,
# and a README.md table (benchmarks/gpu_report.py). The exit status is the number of failed steps.
#
# What the GPU image lacks (mlflow, optuna, fvcore and their needs) is installed from the
# git-ignored wheelhouse/ that benchmarks/gpu_wheels.sh fills on a machine with network.
#
#   bash benchmarks/gpu_check.sh                        # on the GPU machine
#   bash benchmarks/gpu_check.sh --device cpu --smoke   # the same steps, tiny, on CPU (CI)
#   options: --out DIR (default reports/gpu/<device>), --wheelhouse DIR (default wheelhouse),
#            --only STEP,STEP (run only those steps, e.g. inner_sweep,bench_tnt_speed)
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
py=${PYTHON:-python3}
device=cuda smoke=0 out="" wheelhouse=$repo/wheelhouse only=""
while (($#)); do
    case $1 in
        --device) device=$2; shift 2 ;;
        --smoke) smoke=1; shift ;;
        --out) out=$2; shift 2 ;;
        --wheelhouse) wheelhouse=$2; shift 2 ;;
        --only) only=$2; shift 2 ;;
        *) echo "gpu_check.sh: unknown argument '$1' (see the header of $0)" >&2; exit 2 ;;
    esac
done
[[ $device == cuda || $device == cpu ]] || { echo "gpu_check.sh: --device must be cuda or cpu" >&2; exit 2; }

# What the image lacks, from the wheelhouse, into a folder of its own ahead of the image's packages
if ! "$py" -c "import mlflow, optuna, fvcore, tomli_w" 2>/dev/null; then
    if ! compgen -G "$wheelhouse/*.whl" >/dev/null; then
        echo "gpu_check.sh: mlflow, optuna, fvcore or tomli-w is missing and $wheelhouse has no wheels" \
             "(fill it with benchmarks/gpu_wheels.sh on a machine with network)" >&2
        exit 2
    fi
    site=${TMPDIR:-/tmp}/tntbench-site
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" "$wheelhouse"/*.whl || exit 2
    export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$repo${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

if [[ $device == cuda ]] && ! "$py" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_check.sh: no CUDA device here (use --device cpu --smoke on a CPU machine)" >&2
    exit 2
fi
name=$("$py" -c "import torch; print(torch.cuda.get_device_name(0) if '$device' == 'cuda' else 'cpu')")
slug=$(echo "$name" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9' '-' | sed 's/^-*//; s/-*$//')
[[ $smoke == 1 ]] && slug=$slug-smoke
out=${out:-$repo/reports/gpu/$slug}
mkdir -p "$out" || exit 2
out=$(cd "$out" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
: >"$out/steps.tsv"

# step NAME SECONDS COMMAND...: run it under a timeout, log to NAME.log, record rc and seconds
failed=0
step() {
    local name=$1 limit=$(($2 * limit_scale)) t0 rc
    shift 2
    [[ -z $only || ",$only," == *",$name,"* ]] || return 0
    echo "== $name (at most ${limit}s): $*"
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1
    rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - t0))" "$limit" >>"$out/steps.tsv"
    if ((rc != 0)); then
        failed=$((failed + 1))
        echo "   FAILED (exit $rc$( ((rc == 124)) && echo ', timed out')); last lines of $out/$name.log:"
        tail -n 15 "$out/$name.log" | sed 's/^/   | /'
    else
        tail -n 3 "$out/$name.log" | sed 's/^/   | /'
    fi
}

# A smoke run checks that every step runs, not how fast: on a shared 2-core CPU (CI, with other
# tests beside it) a profile's noise rule re-times disturbed windows, so its limits are tripled.
limit_scale=1
if [[ $smoke == 1 ]]; then  # the same steps, tiny
    limit_scale=3
    bench=(--img-size 32 --depth 1 --batch-size 2 --steps 1 --warmup 1 --inner-kernel torch)
    echo "== inner kernel sweep and bench_tnt_speed's Triton rows: not in a CPU smoke run (the" \
         "kernel needs CUDA; its CPU checks are tests/test_triton_inner.py under TRITON_INTERPRET=1)"
    workers=(--train-size 64 --epochs 1)
    step_prof=(--model tnt_nano --batch-size 2 --device cpu --inner-kernel torch)
    big=(tnt_nano deit_nano) prof=(--device cpu --dtype fp32 --batch-size 2 --warmup 1 --steps 2)
    prof_train=() prof_infer=()
    train=(--set data.train_size=64 --set data.val_size=32 --set train.batch_size=32
           --set train.device=\'cpu\' --set model.depth=1)
    data=(--device cpu --rounds 1 --images 8 --batch-size 4 --train-images 16 --val-images 8
          --size 32 --workers 1)
else
    step inner_sweep 75 "$py" benchmarks/bench_inner_kernel.py --models tnt_s --compile-limit 60 \
        --batch-size 128 --json "$out/inner_sweep.json"
    tiles=()
    [[ -s $out/inner_sweep.json ]] && tiles=(--inner-tiles "$out/inner_sweep.json")
    bench=(--batch-size 128 --steps 10 --warmup 3 --inner-kernel torch,triton "${tiles[@]}")
    step_prof=(--model tnt_s_patch16_224 --batch-size 128 --dtype bf16 --device cuda)
    workers=(--train-size 1024 --epochs 2)  # 8,192 ran past 70 s on an H200 box's 16 cores
    big=(tnt_s_patch16_224 deit_small_patch16_224)
    prof=(--device cuda --dtype bf16 --warmup 3 --steps 10)
    prof_train=(--batch-size 128) prof_infer=(--batch-size 256)
    train=(--set data.train_size=10000 --set data.val_size=2000 --set train.batch_size=256
           --set data.workers=6 --set train.device=\'cuda\')
    data=(--device cuda --rounds 2 --images 128 --workers 6 --train-images 4096 --val-images 256)
fi

step bench_tnt_speed 190 "$py" benchmarks/bench_tnt_speed.py --dtypes bf16 --compile \
    "${bench[@]}" --json "$out/bench_tnt_speed.json"
step profile_step 30 "$py" benchmarks/profile_tnt_step.py "${step_prof[@]}" --rows 30
step matrix_workers 45 "$py" benchmarks/bench_matrix_workers.py "${workers[@]}" \
    --json "$out/matrix_workers.json"
# TNT-S at CIFAR-10 size as experiments/cifar10.toml has it: 8x8 grid of 4x4 patches, 1x1 pixels
step train 80 "$py" -m suite train --tracking-uri "sqlite:///$work/mlflow.db" \
    --set model.name=\'tnt_s_patch16_224\' --set model.img_size=32 --set model.patch_size=4 \
    --set model.pixel_size=1 --set data.name=\'synthetic\' --set train.epochs=2 \
    --set tracking.system_metrics=true --set tracking.experiment=\'gpu_check\' \
    --set train.out_dir=\'"$work/runs"\' "${train[@]}"
step profile_train 20 "$py" -m suite profile "${big[@]}" --mode train "${prof[@]}" \
    "${prof_train[@]}" --json "$out/profile_train.json"
step profile_infer 15 "$py" -m suite profile "${big[@]}" --mode infer "${prof[@]}" \
    "${prof_infer[@]}" --json "$out/profile_infer.json"
step bench_data 120 "$py" benchmarks/bench_data.py "${data[@]}" --json "$out/bench_data.json"
step cuda_tests 100 "$py" -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider \
    --junitxml "$out/cuda_tests.xml"
"$py" benchmarks/gpu_report.py "$out" --tracking-uri "sqlite:///$work/mlflow.db" --device-name "$name" \
    || failed=$((failed + 1))
echo "gpu_check: $failed step(s) failed; results in $out (README.md)"
exit "$failed"
