#!/usr/bin/env bash
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
python3 benchmarks/gpu_services_bench.py --parts 6 --method eagle3 --draft-gpu 1 --prompts 4 --repeats 2 --alphas 0.6,0.8 \
  --modes direct-plain,direct-sequential,direct-pipelined,direct-adaptive --time-budget-s 300 --out $OUT > $OUT/run.log 2>&1
grep -E "part 6" $OUT/run.log | cut -c1-420
