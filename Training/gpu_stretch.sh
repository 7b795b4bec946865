#!/usr/bin/env bash
# One stretch of training for the trained models on a machine with a CUDA GPU, then the engine's CUDA checks.
#
#   Training/gpu_stretch.sh MAPS.npz MINUTES OUTDIR          (from the repository root)
#
# Why a script: GPU machines come rarely and briefly, so one prepared command does everything. It needs python3 with
# torch only: label maps come as one bundle (python -m MIADeepLearningLib.training.label_maps FOLDER --bundle
# MAPS.npz). The checkpoints in Training/Checkpoints/ (thick-slice-sr.pt, brain-tissue.pt, brain-registration.pt;
# created when missing)
# are continued at once on the one GPU for MINUTES, their batches drawn ahead by worker processes on the CPU cores
# (the same batches as in-process drawing, see training/common.py); a run that fails is retried once drawing in
# process. Then Testing/Benchmarks/cuda_inference.py (into OUTDIR/gpu.log). Logs go to OUTDIR as they are written; the checkpoints and
# their best-validation copies end as a tar in 15 MB parts (OUTDIR/checkpoints.tar.part-aa, -ab, ...), written
# before the CUDA checks run. Environment: PYTHON (default python3), DEVICE (default cuda), SEGMENTATION_ARGS (extra
# arguments of the tissue run, e.g. "--render-spacing 1 --soft-targets": the recipe the brain-tissue card asks a GPU
# stretch to try; unquoted, so several words are several arguments). The sequence-type classifier
# (Training/Checkpoints/sequence-type.pt) also trains when SimpleITK imports there (its renders are SimpleITK images
# passed through the engine's own preprocessing); without it the log says so and the other three run as before.
set -u
maps=$(realpath "$1") minutes=$2 out=$(realpath "$3")
python=${PYTHON:-python3} device=${DEVICE:-cuda}
root=$(pwd)
mkdir -p "$out" Training/Checkpoints
export PYTHONPATH="$root/MIADeepLearning${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
cores=$(nproc)
synthesis_workers=$(( cores / 4 > 0 ? cores / 4 : 1 ))
segmentation_workers=$(( cores * 3 / 8 > 0 ? cores * 3 / 8 : 1 ))
classification_workers=0
if "$python" -c "import SimpleITK" 2>/dev/null; then classification_workers=$(( cores / 4 > 0 ? cores / 4 : 1 )); fi
registration_workers=$(( cores - synthesis_workers - segmentation_workers - classification_workers - 2 > 0 ? cores - synthesis_workers - segmentation_workers - classification_workers - 2 : 1 ))
deadline=$(( $(date +%s) + $(awk "BEGIN { print int($minutes * 60) }") ))
echo "$(date -u +%FT%TZ) $cores cores: synthesis $synthesis_workers workers, segmentation $segmentation_workers, registration $registration_workers, classification $classification_workers (0: SimpleITK missing, not trained)"
"$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"

train() {  # log module checkpoint workers extra-arguments...
    local log=$1 module=$2 checkpoint=$3 workers=$4
    shift 4
    for drawing in "$workers" 0; do
        local left=$(( deadline - $(date +%s) ))
        if (( left < 30 )); then echo "no time left for $module" >>"$log"; return; fi
        "$python" -m "$module" --label-maps "$maps" --checkpoint "$checkpoint" --device "$device" --threads 1 \
            --workers "$drawing" --max-minutes "$(( left / 60 )).$(( (left % 60) * 10 / 60 ))" "$@" >>"$log" 2>&1 \
            && return
        echo "$(date -u +%FT%TZ) $module failed (exit $?) with --workers $drawing" >>"$log"
    done
}

train "$out/synthesis.log" MIADeepLearningLib.training.train_synthesis Training/Checkpoints/thick-slice-sr.pt \
    "$synthesis_workers" --iterations 40000 &
train "$out/segmentation.log" MIADeepLearningLib.training.train_segmentation Training/Checkpoints/brain-tissue.pt \
    "$segmentation_workers" --iterations 100000 --batch 2 --validate-every 500 ${SEGMENTATION_ARGS:-} &
train "$out/registration.log" MIADeepLearningLib.training.train_registration Training/Checkpoints/brain-registration.pt \
    "$registration_workers" --iterations 150000 --patch 64 --validate-every 500 &
if (( classification_workers > 0 )); then
    train "$out/classification.log" MIADeepLearningLib.training.train_classification \
        Training/Checkpoints/sequence-type.pt "$classification_workers" --iterations 20000 --lr-half-life 4000 \
        --batch 16 --validate-every 200 &
else
    echo "SimpleITK does not import with $python: the sequence-type classifier is not trained" >"$out/classification.log"
fi
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 30 >>"$out/gpu.log" 2>&1 &
    monitor=$!
fi
wait $(jobs -p | grep -vx "${monitor:-none}")
[[ -n ${monitor:-} ]] && kill "$monitor"
echo "$(date -u +%FT%TZ) training done"
tail -n 3 "$out/synthesis.log" "$out/segmentation.log" "$out/registration.log" "$out/classification.log"
tar -cf - -C Training Checkpoints | split -b 15M - "$out/checkpoints.tar.part-"
timeout 90 "$python" Testing/Benchmarks/cuda_inference.py --label-maps "$maps" >>"$out/gpu.log" 2>&1
ls -la "$out"
