#!/usr/bin/env python3
"""Where a broker's latency goes, message by message: the bench's latency samples matched
with the scheduler's trace of the broker's core.

    mkdir -p /tmp/dump
    BENCH_LATENCY_DUMP=/tmp/dump cargo run --release -p edgegw-bench -- --no-build \\
        --suite broker --only latency --brokers edgegw --latency-rounds 1 &
    sleep 3   # past the broker's start and the warm-up
    perf record -e sched:sched_switch -C 0 -k CLOCK_MONOTONIC -o /tmp/sched.data -- sleep 8
    wait
    perf script --ns -F cpu,time,event,trace -i /tmp/sched.data > /tmp/sched.txt
    bench/tools/latency_sched.py /tmp/dump/edgegw-000.txt /tmp/sched.txt THREAD

THREAD is the broker thread that handles the messages (`edgegw-mqtt:wor`, `mosquitto`).
For the messages inside the trace, it prints, for typical ones (p40-p60), fast ones and
slow isolated ones (over --slow µs, neighbours not slow): how long after the send the
thread was switched in, how long it then ran, and how many had another thread on the core
while they were on their way. Slow messages in runs (several in a row) are counted apart:
there the whole core stalled, which no broker controls.
"""

import argparse
import bisect
import re
import statistics
import sys

SWITCH = re.compile(
    r"\[(\d+)\]\s+(\d+)\.(\d+):\s+sched:sched_switch:\s+prev_comm=(.*?) prev_pid=.*"
    r"==> next_comm=(.*?) next_pid="
)


def load_samples(path):
    with open(path) as f:
        header = f.readline()
        match = re.search(r"epoch_monotonic_ns (\d+)", header)
        if not match:
            sys.exit(f"{path}: no epoch_monotonic_ns in the header (not a bench latency dump?)")
        epoch = int(match.group(1))
        rows = sorted(tuple(map(int, line.split())) for line in f if line.strip())
    return [(epoch + sent, latency) for sent, latency in rows]


def load_switches(path, thread):
    ins, outs, others = [], [], []
    with open(path) as f:
        for line in f:
            m = SWITCH.search(line)
            if not m:
                continue
            t = int(m.group(2)) * 1_000_000_000 + int(m.group(3))
            prev, nxt = m.group(4), m.group(5)
            if nxt == thread:
                ins.append(t)
            if prev == thread:
                outs.append(t)
            if nxt != thread and not nxt.startswith("swapper"):
                others.append(t)
    if not ins:
        sys.exit(f"{path}: thread {thread!r} is never switched in")
    return sorted(ins), sorted(outs), sorted(others)


def describe(name, picks, samples, ins, outs, others):
    woke, running, other = [], 0, 0
    for i in picks:
        sent, latency = samples[i]
        arrived = sent + latency
        last_in = bisect.bisect_right(ins, sent) - 1
        last_out = bisect.bisect_right(outs, sent) - 1
        if last_in >= 0 and (last_out < 0 or outs[last_out] < ins[last_in]):
            running += 1
        else:
            k = bisect.bisect_left(ins, sent)
            if k < len(ins) and ins[k] <= arrived:
                o = bisect.bisect_left(outs, ins[k])
                if o < len(outs):
                    woke.append((ins[k] - sent, outs[o] - ins[k], latency))
        lo, hi = bisect.bisect_left(others, sent), bisect.bisect_right(others, arrived)
        other += hi > lo
    if not woke:
        print(f"{name}: {len(picks)} messages, none woke the thread")
        return
    median = lambda k: statistics.median(w[k] for w in woke) / 1000
    print(
        f"{name}: {len(picks)} messages; woke the thread {len(woke)}, thread already "
        f"running {running}; another thread on the core {other}; median µs: "
        f"send → switched in {median(0):.1f}, ran {median(1):.1f}, latency {median(2):.1f}"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("samples")
    parser.add_argument("trace")
    parser.add_argument("thread")
    parser.add_argument("--slow", type=float, default=100.0, help="µs (default 100)")
    args = parser.parse_args()
    samples = load_samples(args.samples)
    ins, outs, others = load_switches(args.trace, args.thread)
    start, end = min(ins[0], outs[0]), max(ins[-1], outs[-1])
    samples = [s for s in samples if start <= s[0] and s[0] + s[1] <= end]
    if not samples:
        sys.exit("no message falls inside the trace: start perf during the measured window")
    slow_ns = args.slow * 1000
    slow = {i for i, (_, latency) in enumerate(samples) if latency > slow_ns}
    isolated = [i for i in sorted(slow) if i - 1 not in slow and i + 1 not in slow]
    order = sorted(range(len(samples)), key=lambda i: samples[i][1])
    n = len(order)
    typical = order[int(0.4 * n) : int(0.6 * n)]
    fast = order[: int(0.1 * n)]
    print(
        f"{n} messages in the trace; over {args.slow:.0f} µs: {len(slow)} "
        f"({len(isolated)} isolated, {len(slow) - len(isolated)} in runs of stalls)"
    )
    describe("fastest 10%", fast, samples, ins, outs, others)
    describe("typical (p40-p60)", typical, samples, ins, outs, others)
    describe(f"isolated over {args.slow:.0f} µs", isolated, samples, ins, outs, others)


if __name__ == "__main__":
    main()
