"""Draws a soak CSV (bench/soak/record.py) as one PNG: RSS and disk, the accepted rate, and
the p99 latencies per interval, against time.

usage: plot.py SOAK_CSV OUT_PNG MACHINE_LINE TARGET_RATE
"""
import csv
import sys

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

rows = list(csv.DictReader(open(sys.argv[1])))
machine, target = sys.argv[3], float(sys.argv[4])
minutes = [float(r['elapsed_s']) / 60 for r in rows]


def col(name):
    return [float(r[name]) if r[name] != '' else float('nan') for r in rows]


fig, (mem, rate, lat) = plt.subplots(3, 1, sharex=True, figsize=(10, 9))
# The machine line, and the settings file's name if one was used (not its whole text).
about = '; '.join(line.split(' (')[0] for line in machine.splitlines())
fig.suptitle(f'tagstream soak: demo at {target:,.0f} events/s, wall clock\n{about}', fontsize=10)
mem.plot(minutes, col('rss_mb'), label='RSS (MB)')
mem.plot(minutes, col('disk_mb'), label='store on disk (MB)')
mem.set_ylabel('MB')
mem.legend(loc='upper left')
mem.grid(alpha=0.3)
rate.plot(minutes, col('accepted_per_s'), color='tab:green', label='accepted events/s')
rate.axhline(target, color='grey', linestyle=':', label='target')
rate.set_ylim(0, max(target, max(col('accepted_per_s'))) * 1.15)
rate.set_ylabel('events/s')
rate.legend(loc='lower left')
rate.grid(alpha=0.3)
lat.plot(minutes, col('p99_event_to_change_ms'), label='p99 event → change (ms)')
lat.plot(minutes, col('p99_timer_lateness_ms'), label='p99 timer lateness (ms)')
lat.axhline(20, color='tab:red', linestyle=':', label='goal: event → change 20 ms')
lat.axhline(100, color='tab:purple', linestyle=':', label='goal: timers 100 ms')
lat.set_ylabel('ms')
lat.set_ylim(bottom=0)
lat.set_xlabel('minutes')
lat.legend(loc='upper left')
lat.grid(alpha=0.3)
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=100)
