#!/usr/bin/env python3
"""Summarise a `py-spy record -f raw` profile: where the proxy's CPU goes, by layer and by function.

    profile_summary.py PROFILE.raw [--top 25]
    profile_summary.py A.raw --compare B.raw --cost A_US B_US   # where A spends more than B, in µs

With --compare, each function's inclusive share of its profile's samples is scaled by that process's
measured CPU per request (or per event), A_US and B_US, and the functions are listed by the difference:
what A (say ccm-wsgi with usage tracking) pays that B (the same without it) does not.

Each sample's leaf frame is charged to a layer (gevent hub/sockets, pywsgi, urllib3, http.client,
email (header parsing), json, logging, ccm_wsgi, ...). Idle samples (the hub waiting in epoll) are
left out, so the shares are of busy CPU. Also lists the hottest functions (self time) and the
inclusive time of every ccm_wsgi function, which is what ccm-wsgi adds on top of a bare proxy.
"""

from __future__ import annotations

import argparse
import collections
import re

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
LAYERS = (
    ("ccm_wsgi/", "ccm_wsgi"),
    ("gevent/pywsgi", "pywsgi"),
    ("gevent/", "gevent hub/sockets"),
    ("urllib3/", "urllib3"),
    ("http/client", "http.client"),
    ("email/", "email (http.client header parsing)"),
    ("json/", "json"),
    ("logging/", "logging"),
    ("flask/", "flask"),
    ("werkzeug/", "werkzeug"),
    ("socket.py", "socket.py"),
    ("ssl.py", "ssl"),
    ("selectors", "selectors"),
)
IDLE = ("run (gevent/hub.py", "wait (gevent/_hub_primitives", "_wait_on_socket")  # epoll waits


def layer(file: str) -> str:
    for needle, name in LAYERS:
        if needle in file:
            return name
    return "other: " + file.rsplit("/", 1)[-1]


def parse(path: str):
    with open(path, encoding="utf-8", errors="replace") as f:
        for raw in f:
            raw = raw.rstrip("\n")
            if not raw:
                continue
            stack, _, count = raw.rpartition(" ")
            frames = [f for f in stack.split(";") if f]
            yield frames, int(count)


def split(frame: str) -> tuple[str, str]:
    m = FRAME.match(frame)
    return (m.group("func"), m.group("file")) if m else (frame, "")


def inclusive(path: str) -> tuple[collections.Counter[str], int]:
    counts: collections.Counter[str] = collections.Counter()
    total = 0
    for frames, n in parse(path):
        total += n
        seen = set()
        for f in frames:
            func, file = split(f)
            key = f"{func} ({file.split('site-packages/')[-1].split('python3.11/')[-1]})"
            if key not in seen:
                seen.add(key)
                counts[key] += n
    return counts, total


def compare(a_path: str, b_path: str, a_us: float, b_us: float, top: int) -> None:
    a, ta = inclusive(a_path)
    b, tb = inclusive(b_path)
    rows = sorted(((a[k] / ta * a_us - b[k] / tb * b_us, a[k] / ta * a_us, b[k] / tb * b_us, k)
                   for k in set(a) | set(b)), reverse=True)
    shared = [r for r in rows if a[r[3]] and b[r[3]]]
    print(f"inclusive µs: A={a_path} ({a_us:g} µs), B={b_path} ({b_us:g} µs); A-B, A, B")
    print("functions only A runs (its own code, and what it calls that B never does):")
    for d, x, y, k in [r for r in rows if not b[r[3]]][:top]:
        print(f"  {d:+7.1f} {x:7.1f} {y:7.1f}  {k}")
    print("functions both run, by how much more A spends in them (negative: A spends less):")
    for d, x, y, k in shared[: top // 2] + shared[-(top // 2):]:
        print(f"  {d:+7.1f} {x:7.1f} {y:7.1f}  {k}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("profile")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--compare", help="a second profile (B)")
    p.add_argument("--cost", nargs=2, type=float, metavar=("A_US", "B_US"), help="CPU µs per unit of A and of B")
    a = p.parse_args()
    if a.compare:
        compare(a.profile, a.compare, *(a.cost or (100.0, 100.0)), a.top)
        return
    by_layer: collections.Counter[str] = collections.Counter()
    by_func: collections.Counter[str] = collections.Counter()
    ccm_incl: collections.Counter[str] = collections.Counter()
    total = idle = 0
    for frames, n in parse(a.profile):
        total += n
        leaf = frames[-1] if frames else ""
        if leaf.startswith("process ") or not frames:
            frames = frames[1:]
            leaf = frames[-1] if frames else ""
        func, file = split(leaf)
        if func in ("run", "wait", "switch") and "hub" in file and len(frames) < 4:
            idle += n
            continue
        by_layer[layer(file)] += n
        by_func[f"{func} ({file.split('site-packages/')[-1]})"] += n
        seen = set()
        for f in frames:
            fn, fl = split(f)
            if "ccm_wsgi/" in fl:
                key = f"{fn} ({fl.split('ccm_wsgi/')[-1]})"
                if key not in seen:
                    seen.add(key)
                    ccm_incl[key] += n
    busy = total - idle
    print(f"samples: {total}, idle (hub waiting): {idle}, busy: {busy}")
    print("\nbusy CPU by layer (leaf frame):")
    for name, n in by_layer.most_common():
        print(f"  {100 * n / busy:5.1f}%  {name}")
    print(f"\nhottest functions (self, top {a.top}):")
    for name, n in by_func.most_common(a.top):
        print(f"  {100 * n / busy:5.1f}%  {name}")
    print("\nccm_wsgi functions (inclusive):")
    for name, n in ccm_incl.most_common(a.top):
        print(f"  {100 * n / busy:5.1f}%  {name}")


if __name__ == "__main__":
    main()
