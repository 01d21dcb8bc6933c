"""Reading Prometheus text as tagstream's /metrics writes it, for the bench scripts
(bench/latency.sh, bench/soak/record.py): samples by name, and a histogram's quantile over
what it recorded between two scrapes."""
import re


def parse(text):
    """Every sample of a scrape, by its name with labels."""
    values = {}
    for line in text.splitlines():
        if line.startswith('#') or not line.strip():
            continue
        name, value = line.rsplit(' ', 1)
        values[name] = float(value)
    return values


def quantile(before, after, metric, q):
    """The q-quantile of what histogram `metric` recorded between two scrapes, interpolated
    within its bucket as Prometheus' histogram_quantile does; None when it recorded
    nothing."""
    buckets = []
    for name, value in after.items():
        m = re.fullmatch(metric + r'_bucket\{le="([^"]+)"\}', name)
        if m:
            le = float('inf') if m.group(1) == '+Inf' else float(m.group(1))
            buckets.append((le, value - before.get(name, 0.0)))
    buckets.sort()
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    prev_le, prev_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == float('inf'):
                return prev_le
            return prev_le + (le - prev_le) * (rank - prev_count) / max(count - prev_count, 1e-9)
        prev_le, prev_count = le, count
    return None
