"""Thread defaults under load (issue 15 item 4): Pipeline answers (ms) at default threads and at
threads=1, with N busy background processes, each configuration in a fresh process, the rounds
alternating them. "old" reproduces the defaults before runtime/threads.py (ONNX Runtime spinning
on, OMP_WAIT_POLICY unset), "new" is the runtime as it is.

    python -m ib_edge.bench.threads_under_load BUNDLE N_BUSY ROUNDS [old:default old:1 new:default new:1]
"""
import json
import os
import subprocess
import sys
import time

CHILD = r'''
import sys, time, json, statistics, os
mode, th = sys.argv[2].split(":")
if mode == "old":   # the defaults before this change: ORT spinning on, OMP_WAIT_POLICY unset
    os.environ.pop("OMP_WAIT_POLICY", None)
    import ib_edge.runtime.threads as T
    T.ORT_SPINNING = "1"
    T.before_torch_import = lambda: None
    import ib_edge.runtime.pipeline as P
    P.before_torch_import = lambda: None
from ib_edge.runtime import Pipeline
from ib_edge.bench import proof_task
t = None if th == "default" else int(th)
ex = proof_task.make_eval_examples(1, seed=3)[0]
pipe = Pipeline.load(sys.argv[1], threads=t)
for _ in range(2): pipe.run(ex["image"], ex["question"], max_new_tokens=8)
ms = []
for _ in range(12):
    t0 = time.perf_counter(); pipe.run(ex["image"], ex["question"], max_new_tokens=8); ms.append((time.perf_counter()-t0)*1e3)
print(json.dumps({"median": statistics.median(ms), "min": min(ms), "max": max(ms)}))
'''


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    bundle, nbusy, rounds = argv[0], int(argv[1]), int(argv[2])
    configs = argv[3:] or ["old:default", "old:1", "new:default", "new:1"]
    busy = [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(nbusy)]
    try:
        time.sleep(1)
        res = {c: [] for c in configs}
        for r in range(rounds):
            for c in configs:
                out = subprocess.run([sys.executable, "-c", CHILD, bundle, c], capture_output=True, text=True)
                res[c].append(json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else out.stderr[-300:])
        print(f"bundle={os.path.basename(bundle)} busy={nbusy} loadavg={os.getloadavg()} cpu={os.cpu_count()}")
        for c, rs in res.items():
            print(f"  threads={c}: median ms per answer by round " + ", ".join(f"{x['median']:.1f} (min {x['min']:.1f}, max {x['max']:.1f})" if isinstance(x, dict) else x for x in rs))
    finally:
        for p in busy:
            p.kill()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
