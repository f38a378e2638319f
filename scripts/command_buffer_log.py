"""Summarise XLA's command-buffer VLOG lines read on stdin; pass every other line through.

Run a benchmark with TF_CPP_MIN_LOG_LEVEL=0 TF_CPP_VMODULE=command_buffer_thunk=3 and pipe its
output here: prints how often a step's CUDA graph was re-recorded because a buffer it uses moved,
how many allocations moved, and the host time each update took.
"""

import collections
import re
import sys

updates = re.compile(r"Updated command buffer in (\d+) .s; num_commands=(\d+)")
moved = re.compile(r"num_commands=(\d+); updated_allocs=(\d+)")
executes = 0
times, allocs = collections.defaultdict(list), collections.Counter()
for line in sys.stdin:
    if "command_buffer_thunk" not in line:
        sys.stdout.write(line)
        continue
    if "Execute command buffer" in line:
        executes += 1
    if m := updates.search(line):
        times[int(m.group(2))].append(int(m.group(1)))
    if m := moved.search(line):
        allocs[(int(m.group(1)), int(m.group(2)))] += 1
print(f"command buffers executed: {executes}")
for n, ts in sorted(times.items()):
    ts.sort()
    print(f"  {n:4d} commands: {len(ts)} updates, median {ts[len(ts) // 2]} us, "
          f"max {ts[-1]} us, total {sum(ts) / 1e3:.1f} ms")
for (n, k), c in sorted(allocs.items()):
    print(f"  {n:4d} commands, {k} moved allocations: {c} times")
