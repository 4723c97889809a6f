#!/usr/bin/env python3
"""Per-hop timeline of a kept `kd-bench arity` run.

Usage: timeline.py RUN_DIR [--rate-mbit 100] [--bin 1.0]

RUN_DIR is one run directory written by `kd-bench arity --log info,kd_agent=debug
--keep-logs DIR` (DIR/runK: nodeI.log, coord.log). For every sender (the coordinator and each
agent with children) it prints the share of its link B used by the chunks its children
accepted, per time bin, and for each node its first/last chunk times and its median lag behind
its parent (the per-hop delay: a piece time plus what waits in the parent's queues). A bin well
under 100 % while a child still lacked chunks is a link left idle.
"""
import collections
import datetime
import os
import re
import sys

ts_re = re.compile(r'^(\S+Z)\s')
acc_re = re.compile(r'chunk accepted index=(\d+)')
par_re = re.compile(r'connected to the parent parent=(\S+)')


def ts(line):
    m = ts_re.match(line)
    if not m:
        return None
    return datetime.datetime.fromisoformat(m.group(1).replace('Z', '+00:00')).timestamp()


def main():
    args = sys.argv[1:]
    rate = 100.0
    binw = 1.0
    if '--rate-mbit' in args:
        i = args.index('--rate-mbit')
        rate = float(args[i + 1])
        del args[i:i + 2]
    if '--bin' in args:
        i = args.index('--bin')
        binw = float(args[i + 1])
        del args[i:i + 2]
    d = args[0]
    nodes = {}
    for f in sorted(os.listdir(d)):
        m = re.match(r'(node\d+)\.log$', f)
        if not m:
            continue
        arr = {}
        parent = 'coord'
        for line in open(os.path.join(d, f), errors='replace'):
            t = ts(line)
            if t is None:
                continue
            a = acc_re.search(line)
            if a:
                arr.setdefault(int(a.group(1)), t)
                continue
            p = par_re.search(line)
            if p:
                parent = p.group(1)
        nodes[m.group(1)] = (parent, arr)
    if not nodes:
        sys.exit('no nodeN.log with chunk lines (run with --log info,kd_agent=debug)')
    t0 = min(min(a.values()) for _, a in nodes.values() if a)
    t1 = max(max(a.values()) for _, a in nodes.values() if a)
    chunks = max(len(a) for _, a in nodes.values())
    # bytes per chunk: 1 MiB default; the rate share uses chunks, so give the chunk size in MiB
    chunk_mib = float(os.environ.get('CHUNK_MIB', '1'))
    per_bin = chunk_mib * 1048576 * 8 / (rate * 1e6)  # seconds of link per chunk
    nbins = int((t1 - t0) / binw) + 1
    children = collections.defaultdict(list)
    for n, (p, _) in nodes.items():
        children[p].append(n)
    key = lambda n: (0, 0) if n == 'coord' else (1, int(n[4:]))
    print(f'{len(nodes)} nodes, {chunks} chunks, span {t1 - t0:.2f} s (first to last accepted chunk)')
    print('node     parent   first_s  last_s  hop_ms  (s from the first accepted chunk; hop_ms: median')
    print('                                           over chunks of this node\'s time behind its parent)')
    for n in sorted(nodes, key=key):
        p, a = nodes[n]
        hop = ''
        if p in nodes:
            lags = sorted(1000 * (t - nodes[p][1][i]) for i, t in a.items() if i in nodes[p][1])
            if lags:
                hop = f'{lags[len(lags) // 2]:7.1f}'
        print(f'{n:8} {p:8} {min(a.values()) - t0:7.2f} {max(a.values()) - t0:7.2f} {hop}')
    print(f'\nlink use per {binw:g} s bin, % of B (chunks accepted by the sender\'s children)')
    for s in sorted(children, key=key):
        use = [0.0] * nbins
        for c in children[s]:
            for t in nodes[c][1].values():
                use[int((t - t0) / binw)] += per_bin
        row = ' '.join(f'{min(999, round(100 * u / binw)):3d}' for u in use)
        kids = ','.join(sorted(children[s], key=key))
        print(f'{s:6} -> {kids}\n   {row}')


if __name__ == '__main__':
    main()
