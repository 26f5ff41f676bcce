#!/usr/bin/env bash
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
python3 benchmarks/gpu_services_bench.py --parts 5 --draft-gpu 1 --alphas 0.8 \
  --load-gateway direct-adaptive \
  --loads 8,8,32,32 --load-gather 0.25 --load-governor off --load-seconds 8 --load-warmup-s 3 --time-budget-s 560 --out $OUT > $OUT/run.log 2>&1
grep -E "part 5 load|part 6" $OUT/run.log | tail -30
tail -40 $OUT/run.log | grep -E "^\|" 
