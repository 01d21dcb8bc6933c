"""Prints, every second for SECONDS, how much of a core each kind of thread of process PID
used (from /proc/PID/task/*/stat; threads named alike, e.g. `rocksdb:low0` and
`rocksdb:low1`, are summed). Run beside seconds.py to see which threads were busy in the
seconds with a high p99 (bench/RESULTS.md, session 44).

usage: threads.py PID SECONDS
"""
import os
import sys
import time

pid, seconds = sys.argv[1], float(sys.argv[2])
hz = os.sysconf('SC_CLK_TCK')


def snapshot():
    """CPU ticks (user + system) used so far by each thread, with its name."""
    threads = {}
    for tid in os.listdir(f'/proc/{pid}/task'):
        try:
            stat = open(f'/proc/{pid}/task/{tid}/stat').read()
        except OSError:
            continue  # a thread that just ended
        name = stat[stat.index('(') + 1:stat.rindex(')')]
        fields = stat[stat.rindex(')') + 2:].split()
        threads[tid] = (name, int(fields[11]) + int(fields[12]))
    return threads


start = time.monotonic()
tick = start
before = snapshot()
while time.monotonic() - start < seconds:
    tick += 1
    time.sleep(max(0.0, tick - time.monotonic()))
    after = snapshot()
    used = {}
    for tid, (name, ticks) in after.items():
        kind = name.rstrip('0123456789-')
        used[kind] = used.get(kind, 0) + ticks - before.get(tid, (name, 0))[1]
    before = after
    print(f'{time.monotonic() - start:.0f} '
          + ' '.join(f'{kind}={100 * t / hz:.0f}%' for kind, t in sorted(used.items()) if t), flush=True)
