"""Summarises a soak CSV (bench/soak/record.py): memory and disk at the start, the end and
their peak; the accepted rate; the p99 event->change latency and timer lateness over the
intervals (median and worst interval).

usage: summary.py SOAK_CSV TARGET_RATE
"""
import csv
import statistics
import sys

rows = list(csv.DictReader(open(sys.argv[1])))
target = float(sys.argv[2])
if not rows:
    sys.exit('no intervals recorded')


def col(name):
    return [float(r[name]) for r in rows if r[name] != '']


def describe(values, unit):
    if not values:
        return '-'
    return f'median {statistics.median(values):,.1f} {unit}, worst {max(values):,.1f} {unit}'


# The first minute fills the cache and the memtables: memory is judged after it.
settled = [r for r in rows if float(r['elapsed_s']) >= 60] or rows
rss = [float(r['rss_mb']) for r in settled]
disk = col('disk_mb')
print(f'{float(rows[-1]["elapsed_s"]):,.0f} s in {len(rows)} intervals at a target of {target:,.0f} events/s')
accepted = col('accepted_per_s')
print(f'accepted: median {statistics.median(accepted):,.0f} events/s, lowest {min(accepted):,.0f} events/s')
print(f'RSS: {rss[0]:,.0f} MB at {float(settled[0]["elapsed_s"]):,.0f} s, {rss[-1]:,.0f} MB at the end, '
      f'peak {max(rss):,.0f} MB')
print(f'disk: {disk[0]:,.1f} MB at the first interval, {disk[-1]:,.1f} MB at the end, peak {max(disk):,.1f} MB')
print(f'p99 event -> change per interval: {describe(col("p99_event_to_change_ms"), "ms")}')
print(f'p99 timer lateness per interval: {describe(col("p99_timer_lateness_ms"), "ms")} '
      f'({sum(col("timers_fired")):,.0f} timers fired)')
print(f'engine queue: worst {max(col("engine_queue_jobs")):,.0f} jobs waiting at a scrape')
