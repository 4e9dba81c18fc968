# the quickstart in fp32 with today's defaults, the machine's other runs paused
cd /work/main && /usr/bin/time -f "wall %e s" .venv/bin/python cavp.py --data vpo_msmi --epochs 80 --no-amp --out /work/demo/fp32-f64-s0 --overwrite > /work/demo/fp32-f64-s0.out 2>&1
