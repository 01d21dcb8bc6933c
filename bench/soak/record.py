"""Scrapes tagstream's /metrics every INTERVAL seconds for SECONDS and writes one CSV row per
interval: elapsed s, RSS MB, store on disk MB, accepted events/s, p99 event->change ms, p99
timer lateness ms (empty when no timer fired), timers fired, engine queue jobs.

usage: record.py METRICS_URL DATA_DIR SECONDS INTERVAL OUT_CSV
"""
import csv
import os
import sys
import time
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
from prom import parse, quantile  # noqa: E402

url, data_dir, seconds, interval, out = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), sys.argv[5]


def scrape():
    return parse(urllib.request.urlopen(url, timeout=10).read().decode())


def disk_bytes(path):
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass  # a file compaction just removed
    return total


def ms(v):
    return '' if v is None else f'{v * 1000:.2f}'


started = time.monotonic()
before = scrape()
with open(out, 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(['elapsed_s', 'rss_mb', 'disk_mb', 'accepted_per_s', 'p99_event_to_change_ms',
                'p99_timer_lateness_ms', 'timers_fired', 'engine_queue_jobs'])
    tick = started
    while time.monotonic() - started < seconds:
        tick += interval
        time.sleep(max(0.0, tick - time.monotonic()))
        after = scrape()
        accepted = after.get('tagstream_events_total{result="accepted"}', 0) - before.get(
            'tagstream_events_total{result="accepted"}', 0)
        fired = after.get('tagstream_timers_fired_total', 0) - before.get('tagstream_timers_fired_total', 0)
        w.writerow([
            f'{time.monotonic() - started:.0f}',
            f'{after.get("process_resident_memory_bytes", 0) / 2**20:.0f}',
            f'{disk_bytes(data_dir) / 2**20:.1f}',
            f'{accepted / interval:.0f}',
            ms(quantile(before, after, 'tagstream_event_to_change_seconds', 0.99)),
            ms(quantile(before, after, 'tagstream_timer_lateness_seconds', 0.99)),
            f'{fired:.0f}',
            f'{after.get("tagstream_engine_queue_jobs", 0):.0f}',
        ])
        f.flush()
        before = after
