#!/usr/bin/env python3
"""The two halves of `instructions.sh`: an exact number of requests, and the report of callgrind's counts.

    instructions.py load PORT REQUESTS CONCURRENCY   # REQUESTS non-streaming requests (load.py's body, user alice)
    instructions.py report OUT_DIR REQUESTS NAME...  # instructions per request of each server, their ratios,
                                                     # and the functions whose own instructions differ most

Instructions, unlike CPU time, do not move with the other processes on the machine or the VM's neighbours: a
config's count per request repeats within about 1 % (timers such as the usage file's save every minute fall in
the measured window or not). They leave out the kernel's part (system calls) and what cache misses cost.
"""

from __future__ import annotations

import collections
import glob
import http.client
import os
import re
import sys
import threading

here = os.path.dirname(os.path.abspath(__file__))
_NAMED = re.compile(r"c?fn=\((\d+)\)(?: (.*))?")  # callgrind's compressed function names: "(id) name" once
_RECURSION = re.compile(r"'\d+$")  # callgrind's suffix for a function's recursion depth ("f'2")


def load(port: int, requests: int, concurrency: int) -> None:
    sys.path[:0] = [os.environ.get("BENCH_DIR", os.path.join(here, "../../../shared/bench")), here]
    import genconfig  # found once the paths are set
    import load as harness

    body = harness.messages_body(1000, False)
    headers = {"content-type": "application/json", "anthropic-version": "2023-06-01",
               "x-api-key": genconfig.USER_TOKENS["alice"]}
    failed: list[int] = []

    def client(count: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        for _ in range(count):
            conn.request("POST", "/v1/messages", body, headers)
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                failed.append(response.status)

    shares = [requests // concurrency + (i < requests % concurrency) for i in range(concurrency)]
    threads = [threading.Thread(target=client, args=(share,)) for share in shares]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failed:
        sys.exit(f"{len(failed)} of {requests} requests failed (statuses {sorted(set(failed))})")


def own_costs(path: str) -> collections.Counter[str]:
    """Instructions executed in each function itself (callees excluded), from a callgrind output file."""
    names: dict[str, str] = {}
    costs: collections.Counter[str] = collections.Counter()
    current = ""
    after_call = False  # the cost line after `calls=` is the callee's inclusive cost, not the caller's own
    with open(path, errors="replace") as lines:
        for line in lines:
            if line.startswith(("fn=", "cfn=")):
                found = _NAMED.match(line.strip())
                if found is not None:
                    if found.group(2):
                        names[found.group(1)] = _RECURSION.sub("", found.group(2))
                    if line.startswith("fn="):
                        current = names.get(found.group(1), "?")
            elif line.startswith("calls="):
                after_call = True
            elif line[:1].isdigit() or line[:1] in "+-*":
                if after_call:
                    after_call = False
                    continue
                fields = line.split()
                if len(fields) >= 2 and current:
                    costs[current] += int(fields[1])
    return costs


def report(out_dir: str, requests: int, names: list[str]) -> None:
    per: dict[str, collections.Counter[str]] = {}
    for name in names:
        dumps = sorted(glob.glob(os.path.join(out_dir, name, "callgrind.out.*.1")))
        if not dumps:
            sys.exit(f"no callgrind dump for {name} in {out_dir}/{name}")
        per[name] = own_costs(dumps[-1])
    totals = {name: sum(costs.values()) / requests for name, costs in per.items()}
    for name in names:
        print(f"{name:7s} {totals[name] / 1e6:7.3f} M instructions per request ({requests} requests)")
    for later, earlier in zip(names[1:], names, strict=False):
        print(f"\n{later} / {earlier}: {totals[later] / totals[earlier]:.3f}; the functions whose own "
              "instructions per request differ most:")
        a, b = per[earlier], per[later]
        diffs = sorted(((b[f] - a[f]) / requests, f) for f in set(a) | set(b))
        for diff, function in sorted(diffs, key=lambda d: -abs(d[0]))[:15]:
            print(f"  {diff:+9.0f}  {function[:110]}")


def main() -> None:
    if sys.argv[1:2] == ["load"]:
        load(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    elif sys.argv[1:2] == ["report"]:
        report(sys.argv[2], int(sys.argv[3]), sys.argv[4:])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
