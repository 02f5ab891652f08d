#!/usr/bin/env bash
# Distillation of the quickstart's shapes model (issue 26): guided -> progressive 4-step student, and a 4-step
# consistency student, against the teacher at DDIM 50 with guidance; adherence (the shapes evaluator) and domain
# FID on 200 reference captions, with forwards per sample. Run the steps one after another: two trainings at once
# on 2 cores oversubscribe the threads and each runs several times slower.
#   bash benchmarks/distill_shapes.sh logs/<quickstart txt2img run>/checkpoints/last.ckpt [logdir] [outdir]
set -euo pipefail
TEACHER=${1:?the teacher checkpoint (a shapes_txt2img run)}
LOGS=${2:-logs}
OUT=${3:-outputs/eval/distill}
PY=${PY:-python}
run() { echo "+ $*"; local t0=$SECONDS; "$@"; echo "($((SECONDS - t0)) s wall)"; }
latest() { ls -d "$LOGS"/*_"$1" | tail -n 1; }

run $PY main.py --base configs/distill/shapes_guided.yaml -t -n shapes_guided -l "$LOGS" \
    model.params.ckpt_path="$TEACHER" lightning.trainer.enable_progress_bar=false
GUIDED=$(latest shapes_guided)
run $PY main.py --base configs/distill/shapes_progressive.yaml -t -n shapes_prog -l "$LOGS" \
    model.params.ckpt_path="$GUIDED/checkpoints/last.ckpt" lightning.trainer.enable_progress_bar=false
run $PY main.py --base configs/distill/shapes_consistency.yaml -t -n shapes_cd -l "$LOGS" \
    model.params.ckpt_path="$TEACHER" lightning.trainer.enable_progress_bar=false
CLS="$OUT/domain_shapes.safetensors"
[ -f "$CLS" ] || run $PY scripts/train_domain_classifier.py --base configs/ldm/shapes_txt2img.yaml \
    --labels shape color size position --train_set params.num_samples=8000 --validation_set params.num_samples=1000 \
    --out "$CLS"
EVAL=(--n 200 --batch_size 100 --metrics domain_fid adherence --domain_classifier "$CLS"
      --reference_set params.num_samples=1000)
run $PY scripts/evaluate.py -r "$TEACHER" "${EVAL[@]}" --steps 50 4 2 --scales 3 --outdir "$OUT/teacher"
run $PY scripts/evaluate.py -r "$GUIDED" "${EVAL[@]}" --steps 50 4 --scales 3 --outdir "$OUT/guided"
run $PY scripts/evaluate.py -r "$(latest shapes_prog)" "${EVAL[@]}" --steps 4 --scales 3 --outdir "$OUT/progressive"
run $PY scripts/evaluate.py -r "$(latest shapes_cd)" "${EVAL[@]}" --steps 4 2 1 --scales 3 --outdir "$OUT/consistency"
