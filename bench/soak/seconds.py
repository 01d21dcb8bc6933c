"""Scrapes tagstream's /metrics every INTERVAL seconds for SECONDS and prints one line per
interval: p50 and p99 of event -> change (ms), groups committed, events per group, mean
write and group (taken -> answered) times (ms), index checkpoints and their time (ms),
timers fired, engine queue. At the end, the p50/p99/p99.9 of the whole run and of the part
after STEADY seconds (default 300: when a 5-minute retention is reached). Used to find
where the p99 of a soak comes from (a stall every checkpoint, bursts of slow groups).

usage: seconds.py METRICS_URL SECONDS [INTERVAL] [STEADY]
"""
import os
import sys
import time
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
from prom import parse, quantile  # noqa: E402

url, seconds = sys.argv[1], float(sys.argv[2])
interval = float(sys.argv[3]) if len(sys.argv) > 3 else 1.0
steady_from = float(sys.argv[4]) if len(sys.argv) > 4 else 300.0
E2C = 'tagstream_event_to_change_seconds'


def scrape():
    return parse(urllib.request.urlopen(url, timeout=10).read().decode())


def delta(after, before, name):
    return after.get(name, 0) - before.get(name, 0)


def mean_ms(after, before, name):
    return 1000 * delta(after, before, name + '_sum') / max(delta(after, before, name + '_count'), 1)


def ms(v):
    return '-' if v is None else f'{v * 1000:.0f}'


start = time.monotonic()
first = before = scrape()
steady = None
tick = start
print('t p50 p99 groups events/group write_ms group_ms checkpoints checkpoint_ms timers queue')
while time.monotonic() - start < seconds:
    tick += interval
    time.sleep(max(0.0, tick - time.monotonic()))
    after = scrape()
    groups = delta(after, before, 'tagstream_group_commit_events_count')
    events = delta(after, before, 'tagstream_group_commit_events_sum')
    print(f"{time.monotonic() - start:.1f} {ms(quantile(before, after, E2C, 0.5))} "
          f"{ms(quantile(before, after, E2C, 0.99))} {groups:.0f} {events / max(groups, 1):.0f} "
          f"{mean_ms(after, before, 'tagstream_commit_write_seconds'):.1f} "
          f"{mean_ms(after, before, 'tagstream_batch_apply_seconds'):.1f} "
          f"{delta(after, before, 'tagstream_index_checkpoint_seconds_count'):.0f} "
          f"{1000 * delta(after, before, 'tagstream_index_checkpoint_seconds_sum'):.0f} "
          f"{delta(after, before, 'tagstream_timers_fired_total'):.0f} "
          f"{after.get('tagstream_engine_queue_jobs', 0):.0f}", flush=True)
    before = after
    if steady is None and time.monotonic() - start >= steady_from:
        steady = after
for name, since in [('whole run', first), (f'from {steady_from:.0f} s', steady)]:
    if since is not None:
        print(name, 'p50', ms(quantile(since, after, E2C, 0.5)), 'p99', ms(quantile(since, after, E2C, 0.99)),
              'p99.9', ms(quantile(since, after, E2C, 0.999)), 'timers p99',
              ms(quantile(since, after, 'tagstream_timer_lateness_seconds', 0.99)))
