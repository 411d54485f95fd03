set -u
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0 EPCOMM_TIMEOUT_S=8
nvidia-smi -L
t0=$(date +%s)
cmake -S . -B build -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_BUILD_TYPE=Release > $OUT/cfg.log 2>&1 && cmake --build build -j32 > $OUT/build.log 2>&1 || { tail -40 $OUT/build.log; exit 1; }
echo "build $(( $(date +%s)-t0 ))s"
export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps/pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps/log
mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY
nvidia-cuda-mps-control -d && echo "mps on"
cd build && timeout 330 ctest --timeout 240 --output-on-failure > $OUT/test.log 2>&1
echo "tests rc=$? $(( $(date +%s)-t0 ))s"
grep -E "tests passed|Test +#|\(Failed\)|Timeout" $OUT/test.log | tail -30
grep -E "^\[  FAILED|Failure|error:" $OUT/test.log | head -40
echo quit | nvidia-cuda-mps-control; sleep 2
unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
cd .. && timeout 170 mpirun -np 2 --allow-run-as-root --bind-to none -x NCCL_NVLS_ENABLE build/bench/ep_bench --json $OUT/bench.json > $OUT/bench.log 2> $OUT/bench.err
echo "bench rc=$? $(( $(date +%s)-t0 ))s"
sed -n '/^op /,$p' $OUT/bench.log | head -50
tail -5 $OUT/bench.err
