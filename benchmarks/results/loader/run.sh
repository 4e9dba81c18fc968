# The loader benchmark, 4 rounds of alternating processes on the same files (/tmp/loader_bench),
# with the machine's other runs paused (kill -STOP): /work/wt/float is a worktree of commit 0e46cc9
# (float32 samples), /work/wt/after of commit 7734d7c (uint8 samples cut by PIL), /work/main the
# program with device windows, with data.worker_init and with glibc's malloc defaults.
cd /work/demo/loader
for r in 1 2 3 4; do
  (cd /work/wt/float && OMP_NUM_THREADS=1 /work/main/.venv/bin/python benchmarks/loader.py --root /tmp/loader_bench --rounds 5) > float-$r.txt 2>&1
  (cd /work/wt/after && OMP_NUM_THREADS=1 .venv/bin/python benchmarks/loader.py --root /tmp/loader_bench --rounds 5) > uint8-$r.txt 2>&1
  (cd /work/main && OMP_NUM_THREADS=1 .venv/bin/python benchmarks/loader.py --root /tmp/loader_bench --rounds 5) > window-$r.txt 2>&1
  (cd /work/main && OMP_NUM_THREADS=1 .venv/bin/python benchmarks/loader.py --root /tmp/loader_bench --rounds 5 --malloc-defaults) > window-defaults-$r.txt 2>&1
done
