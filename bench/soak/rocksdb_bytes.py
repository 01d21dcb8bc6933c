"""Bytes RocksDB wrote per column family, from the LOG files in a store directory: what
flushes wrote (memtables to level-0 tables) and what compactions wrote (tables rewritten).
The two together are the background writing that competes with the engine for the
machine's two cores and its disk (bench/RESULTS.md, "Window chunks of 32 positions").

usage: rocksdb_bytes.py DATA_DIR
"""
import collections
import glob
import re
import sys

COMPACTED = re.compile(r'\[(\w+)\] \[JOB \d+\] Compacted .* => (\d+) bytes')
FLUSHED = re.compile(r'\[(\w+)\] \[JOB \d+\] Level-0 flush table #\d+: (\d+) bytes')


def main(data_dir):
    compacted, flushed = collections.Counter(), collections.Counter()
    for path in glob.glob(data_dir + '/LOG*'):
        with open(path, errors='replace') as log:
            for line in log:
                for pattern, counter in ((COMPACTED, compacted), (FLUSHED, flushed)):
                    m = pattern.search(line)
                    if m:
                        counter[m.group(1)] += int(m.group(2))
    for what, counter in (('flushed', flushed), ('compacted', compacted)):
        parts = ', '.join(f'{cf} {n >> 20}' for cf, n in counter.most_common() if n >> 20)
        print(f'{what} MiB: total {sum(counter.values()) >> 20} ({parts})')


if __name__ == '__main__':
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
