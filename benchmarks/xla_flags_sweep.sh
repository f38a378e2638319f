#!/usr/bin/env bash
# Decode step and engine step under XLA flag variants (GPU machine, after scripts/device_env.sh):
#   bash benchmarks/xla_flags_sweep.sh MODEL [SECONDS_PER_RUN] [VARIANT,...] [BATCHES]
# Prints each variant's roofline table (batches BATCHES, default 64; context 2048), host overhead
# and device profile.
model=${1:-gemma2-2b}
limit=${2:-200}
only=${3:-}
batches=${4:-64}
variants=(
  "default|"
  "command-buffers-off|--xla_gpu_enable_command_buffer="
  "command-buffers-min1|--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN --xla_gpu_graph_min_graph_size=1"
  "no-triton-gemm|--xla_gpu_enable_triton_gemm=false"
  "cublaslt|--xla_gpu_enable_cublaslt=true"
  "block-level-fusion|--xla_gpu_experimental_enable_fusion_block_level_rewriter=true"
  "triton-heroless-fusion|--xla_gpu_experimental_enable_triton_heroless_priority_fusion=true"
  "triton-warp-specialization|--xla_gpu_experimental_enable_triton_warp_specialization=true"
  # programmatic dependent launch (Hopper): a kernel's prologue overlaps the previous kernel's
  # tail; newer XLA turns both on by default, so "off" says what they are worth here
  "pdl-off|--xla_gpu_enable_pdl=false"
  "pdl-on|--xla_gpu_enable_pdl=true --xla_gpu_enable_pdl_launch=true"
  "dump-hlo|--xla_dump_to=/tmp/hlo-dump --xla_dump_hlo_module_re=.*forward.*"
)
for v in "${variants[@]}"; do
  name=${v%%|*}
  flags=${v#*|}
  [[ -n $only && ",$only," != *",$name,"* ]] && continue
  echo "=== $model $name: XLA_FLAGS='$flags'"
  XLA_FLAGS="$flags" OUT= JAXPAGE_RESULTS_DIR=/tmp/sweep-$name timeout "$limit" \
    python3 -m jaxpage.benchmarks.roofline --model "$model" --batches "$batches" --contexts 2048 \
    --profile-device 2>&1 | grep -v -i "warn\|rematerial\|cuda_timer\|delay kernel" \
    | sed -n '/^batch/,$p' | head -24
done
