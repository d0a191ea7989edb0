#!/usr/bin/env bash
# One-shot GPU session: the `cuda`-marked tests, then CUDA benchmarks. The parts fit one device call each
# (at most about 8 minutes of timeouts); pick them by argument, most urgent first:
#   bash benchmarks/cuda_checks.sh dense          # issue 3's figures: loss/post grid, RetinaNet and FCOS R18 steps (~470 s)
#   bash benchmarks/cuda_checks.sh r50            # issue 3's RetinaNet R50-FPN step at 800x1333 (~240 s)
#   bash benchmarks/cuda_checks.sh two_stage seg  # Faster/Mask R-CNN and segmentation grids (~300 s)
#   bash benchmarks/cuda_checks.sh gen            # own UNet vs diffusers UNet2DModel, eager/bf16/compile (~120 s)
# Writes logs and JSON to ${OUT:-.}. Runs against the checkout (PYTHONPATH=.), using the machine's own
# torch/torchvision/timm.
set -uo pipefail
out=${OUT:-.}
parts=${*:-dense}
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" \
  | tee -a "$out/gpu.txt"
timeout 70 python3 -m pytest tests/test_devices.py -m cuda -q -p no:cacheprovider 2>&1 | tail -15 | tee "$out/cuda_tests.txt"
for part in $parts; do
  case $part in
    dense)
      # loss / post-processing grid, eager
      timeout 130 python3 benchmarks/detection.py --device cuda --no-step --repeats 10 \
        --json "$out/det_cuda_eager.json" 2>&1 | tee "$out/det_cuda_eager.txt"
      # full training steps: cvzoo compiled + bf16 + channels_last vs torchvision eager fp32
      timeout 270 python3 benchmarks/detection.py --device cuda --step-only --compile --amp bf16 --channels-last \
        --skip-explain --models retinanet fcos --step-sizes 320 --step-batches 16 --step-repeats 10 \
        --json "$out/det_cuda_step_r18.json" 2>&1 | grep -vi warn | tee "$out/det_cuda_step_r18.txt"
      ;;
    r50)
      timeout 170 python3 benchmarks/detection.py --device cuda --step-only --compile --amp bf16 --channels-last \
        --skip-explain --depth 50 --models retinanet --step-sizes 1333 --step-height 800 --step-batches 4 \
        --step-repeats 5 --json "$out/det_cuda_step_r50.json" 2>&1 | grep -vi warn | tee "$out/det_cuda_step_r50.txt"
      ;;
    two_stage)
      # Faster / Mask R-CNN ResNet-50 FPN, eager fp32 both, batch 2 and 8 at 800 px
      timeout 120 python3 benchmarks/two_stage.py --device cuda --size 800 --batches 2 8 --repeats 5 \
        --json "$out/two_stage_cuda.json" 2>&1 | tee "$out/two_stage_cuda.txt"
      ;;
    seg)
      # DeepLabV3 / FCN ResNet-50 at 512 px, eager fp32 and bf16 (add --modes compile when time allows)
      timeout 110 python3 benchmarks/segmentation.py --device cuda --modes eager bf16 --batches 8 --size 512 \
        --repeats 10 --json "$out/segmentation_cuda.json" 2>&1 | grep -vi warn | tee "$out/segmentation_cuda.txt"
      ;;
    gen)
      # diffusion denoisers at 64 px, batch 128: training step and denoiser call (diffusers needed on the machine)
      timeout 150 python3 benchmarks/generative.py --device cuda --size 64 --batch 128 --modes eager bf16 compile \
        --json "$out/generative_cuda.json" 2>&1 | grep -vi warn | tee "$out/generative_cuda.txt"
      ;;
    *) echo "unknown part $part (dense, r50, two_stage, seg, gen)" >&2 ;;
  esac
done
