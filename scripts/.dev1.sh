export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
nvidia-smi -L
python3 -m pytest -q -p no:cacheprovider tests/runtime/test_cuda_graph_chain.py 2>&1 | tail -15
timeout 260 python3 benchmarks/gpu_services_bench.py --parts 6 --alphas 0.8 --target-gpu 0 --draft-gpu 1 --time-budget-s 220 --out $OUT > $OUT/p6_tp1.log 2>&1; echo rc $?; tail -12 $OUT/p6_tp1.log
timeout 280 python3 benchmarks/gpu_services_bench.py --parts 6 --alphas 0.8 --target-tp 2 --target-gpu 0 --draft-gpu 2 --time-budget-s 230 --out $OUT > $OUT/p6_tp2.log 2>&1; echo rc $?; tail -12 $OUT/p6_tp2.log
