#!/usr/bin/env bash
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
python3 benchmarks/gpu_services_bench.py --parts 5 --draft-gpu 1 --alphas 0.8 --load-gateway direct-adaptive \
  --loads 1,8,32,64 --load-gather 0,0.25 --load-seconds 8 --load-warmup-s 3 --out $OUT > $OUT/p5.log 2>&1 &
B=$!
n=0
while kill -0 $B 2>/dev/null; do
  sleep 20
  T=$(pgrep -f "bench_tiers.py target" | head -1)
  if [ -n "$T" ] && grep -q "part 5 load 1 " $OUT/p5.log; then
    n=$((n+1))
    echo "prof $n at $(date +%T) after: $(grep 'part 5 load' $OUT/p5.log | tail -1 | cut -c1-60)" >> $OUT/prof_index.txt
    timeout 20 .whl/py-spy record -p $T -d 5 -t -f raw -o $OUT/prof_target_$n.raw -r 250 --nonblocking > /dev/null 2>&1 || echo "py-spy failed" >> $OUT/prof_index.txt
  fi
done
wait $B
tail -45 $OUT/p5.log
