"""Run a command and write its wall time and peak RSS as JSON: ``python _spawn.py RESULT CMD...``.

Linux carries a process's peak RSS across ``exec`` (``ru_maxrss`` keeps the pre-exec high-water
mark), so a route forked straight from the benchmark driver, which holds models in memory, would
report the driver's RSS. This small process starts the route instead, so ``os.wait4`` reports the
route's own peak (the largest of it and the descendants it reaped).
"""

import json
import os
import subprocess
import sys
import time

start = time.perf_counter()
proc = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(proc.pid, 0)
seconds = time.perf_counter() - start
with open(sys.argv[1], "w") as f:
    json.dump({"seconds": seconds, "maxrss_kib": usage.ru_maxrss, "exit": os.waitstatus_to_exitcode(status)}, f)
sys.exit(os.waitstatus_to_exitcode(status))
