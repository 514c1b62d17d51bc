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

THREAD is the name of the broker thread that handles the messages (`edgegw-mqtt:wor`,
`mosquitto`; threads of the same name count as one). For the messages inside the trace,
it prints, for typical ones (p40-p60), fast ones and slow isolated ones (over --slow µs,
neighbours not slow): how long after the send the thread was switched in, how long from
then until the subscriber had the message, how long the thread ran, and how many had
another thread on the core while they were on their way (already running at the send, or
switched in before the arrival). Slow messages in runs (several in a row) are counted
apart, with the length and span of the runs: there the core stalled as a whole.
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
    """Switch-in and switch-out times of `thread`, and every switch with whether it put
    another thread (neither `thread` nor idle) on the core."""
    ins, outs, switches = [], [], []
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
            switches.append((t, nxt != thread and not nxt.startswith("swapper")))
    if not ins or not outs:
        sys.exit(f"{path}: thread {thread!r} is never switched in and out")
    switches.sort()
    return sorted(ins), sorted(outs), switches


def another_thread(switches, times, sent, arrived):
    """Whether a thread other than the broker's held the core at some point between
    `sent` and `arrived`."""
    k = bisect.bisect_right(times, sent) - 1
    if k >= 0 and switches[k][1]:
        return True
    hi = bisect.bisect_right(times, arrived)
    return any(other for _, other in switches[k + 1 : hi])


def describe(name, picks, samples, ins, outs, switches):
    times = [t for t, _ in switches]
    woke, running, other, neither = [], 0, 0, 0
    for i in picks:
        sent, latency = samples[i]
        arrived = sent + latency
        last_in = bisect.bisect_right(ins, sent) - 1
        last_out = bisect.bisect_right(outs, sent) - 1
        if last_in >= 0 and (last_out < 0 or outs[last_out] < ins[last_in]):
            running += 1
        else:
            k = bisect.bisect_left(ins, sent)
            o = bisect.bisect_left(outs, ins[k]) if k < len(ins) else len(outs)
            if k < len(ins) and ins[k] <= arrived and o < len(outs):
                woke.append((ins[k] - sent, arrived - ins[k], outs[o] - ins[k], latency))
            else:
                neither += 1
        other += another_thread(switches, times, sent, arrived)
    head = (
        f"{name}: {len(picks)} messages; woke the thread {len(woke)}, thread already "
        f"running {running}, neither (left out) {neither}; another thread on the core {other}"
    )
    if not woke:
        print(head)
        return
    median = lambda k: statistics.median(w[k] for w in woke) / 1000
    print(
        f"{head}; medians, µs: send → switched in {median(0):.1f}, switched in → "
        f"delivered {median(1):.1f}, ran {median(2):.1f}, latency {median(3):.1f}"
    )


def stall_runs(samples, slow):
    """Runs of consecutive slow messages: their lengths and spans (first send to last
    arrival), in µs."""
    runs, start = [], None
    for i in range(len(samples) + 1):
        if i < len(samples) and i in slow:
            start = i if start is None else start
        elif start is not None:
            if i - start > 1:
                span = samples[i - 1][0] + samples[i - 1][1] - samples[start][0]
                runs.append((i - start, span / 1000))
            start = None
    return runs


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("samples")
    parser.add_argument("trace")
    parser.add_argument("thread")
    parser.add_argument("--slow", type=float, default=100.0, help="µs (default 100)")
    args = parser.parse_args()
    samples = load_samples(args.samples)
    ins, outs, switches = load_switches(args.trace, args.thread)
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
    describe("fastest 10%", fast, samples, ins, outs, switches)
    describe("typical (p40-p60)", typical, samples, ins, outs, switches)
    describe(f"isolated over {args.slow:.0f} µs", isolated, samples, ins, outs, switches)
    runs = stall_runs(samples, slow)
    if runs:
        lengths = sorted(n for n, _ in runs)
        spans = sorted(span for _, span in runs)
        print(
            f"runs of slow messages: {len(runs)}; length median {statistics.median(lengths)}, "
            f"max {lengths[-1]}; span median {statistics.median(spans):.0f} µs, "
            f"max {spans[-1]:.0f} µs"
        )


if __name__ == "__main__":
    main()
