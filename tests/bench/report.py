#!/usr/bin/env python3
"""The issue's targets, computed from one `load.py --json` result (all ratios from the same run).

    report.py results-STAMP.json [--out-dir DIR]

Prints Markdown: the run's metadata, then one row per target with the measured values, the ratio
and whether it is met. Target names are the ones tests/bench/run.sh gives: ccm-wsgi, gevent (the bare
gevent + Flask + urllib3 proxy), ccm-nousage, ccm-limits, ccm-nometrics, gunicorn-w1, gunicorn-w2, and the
twins ccm-twin and ccm-nousage-twin. A config measured in two processes (ccm-wsgi and ccm-twin; ccm-nousage
and ccm-nousage-twin) is one sample of twice the points: its figure is the median over both processes'
points, not one process's; each twin against its first is shown as the run's noise floor.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics


def fmt(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json")
    p.add_argument("--out-dir", default="")
    p.add_argument("--main", default="ccm-wsgi")
    p.add_argument("--ref", default="gevent")
    p.add_argument("--twin", action="append", default=["ccm-wsgi=ccm-twin", "ccm-nousage=ccm-nousage-twin"],
                   help="FIRST=SECOND: two processes of one config, pooled under FIRST's name")
    a = p.parse_args()
    with open(a.json) as f:
        doc = json.load(f)
    summary = {(s["phase"], s["level"], s["target"]): s for s in doc["summary"]}
    cfg, meta = doc["config"], doc["meta"]

    twins = dict(pair.split("=", 1) for pair in a.twin)
    repeats: dict[tuple[str, int, int], dict[str, dict]] = {}
    for point in doc["points"]:
        repeats.setdefault((point["phase"], point["level"], point["repeat"]), {})[point["target"]] = point["metrics"]

    def processes(target: str) -> list[str]:
        """The processes measured as `target`: it, and its twin when the run has one."""
        twin = twins.get(target)
        return [target, twin] if twin and any(twin in m for m in repeats.values()) else [target]

    def get(phase: str, level: int, target: str, key: str) -> float | None:
        """A figure of `target`: load.py's median, or with a twin the median over both processes' points."""
        if len(processes(target)) == 1 or key not in ("proxy_cpu_ms_per_req", "proxy_cpu_us_per_event"):
            return summary.get((phase, level, target), {}).get(key)
        values = [m[t][key] for (ph, lv, _), m in repeats.items() if ph == phase and lv == level
                  for t in processes(target) if m.get(t, {}).get(key)]
        return statistics.median(values) if values else None

    def paired(phase: str, level: int, a: str, b: str, key: str, pool: bool = True) -> str:
        """Median over repeats of a/b within each repeat (targets of one repeat run back to back); with twins
        (`pool`), each process of `a` against each process of `b` (first with first, twin with twin)."""
        pa, pb = (processes(a), processes(b)) if pool else ([a], [b])
        pairs = list(zip(pa, pb, strict=True)) if len(pa) == len(pb) else [(x, y) for x in pa for y in pb]
        ratios = sorted(m[x][key] / m[y][key] for (ph, lv, _), m in repeats.items() if ph == phase and lv == level
                        for x, y in pairs if m.get(x, {}).get(key) and m.get(y, {}).get(key))
        if len(ratios) < 2:
            return ""
        mid = len(ratios) // 2
        med = ratios[mid] if len(ratios) % 2 else (ratios[mid - 1] + ratios[mid]) / 2
        return f" (per repeat: {', '.join(f'{r:.2f}' for r in ratios)}; median {med:.2f})"

    def div(x: float | None, y: float | None) -> float | None:
        return None if x is None or y is None or y == 0 else x / y

    rows = []

    def row(name: str, value: str, ratio: float | None, goal: str, ok: bool | None) -> None:
        verdict = "-" if ok is None else ("met" if ok else "NOT met")
        rows.append(f"| {name} | {value} | {fmt(ratio)} | {goal} | {verdict} |")

    m, r = a.main, a.ref
    levels_ns = [lv for (ph, lv, t) in summary if ph == "nonstream" and t == m]
    levels_st = [lv for (ph, lv, t) in summary if ph == "stream" and t == m]
    levels_hold = [lv for (ph, lv, t) in summary if ph == "hold" and t == m]
    c = 16 if 16 in levels_ns else (levels_ns[0] if levels_ns else None)
    n = 100 if 100 in levels_st else (levels_st[0] if levels_st else None)

    def versus(label: str, phase: str, level: int, a_t: str, b_t: str, key: str, digits: int, most: float) -> None:
        """One CPU ratio row: `a_t` against `b_t` in one phase and level, met when at most `most`."""
        x, y = get(phase, level, a_t, key), get(phase, level, b_t, key)
        q = div(x, y)
        row(label, f"{fmt(x, digits)} vs {fmt(y, digits)}" + paired(phase, level, a_t, b_t, key), q,
            f"≤ {most:.2f}", None if q is None else q <= most)

    ms, us = "proxy_cpu_ms_per_req", "proxy_cpu_us_per_event"
    if c is not None:
        versus(f"CPU ms per non-streaming request, c={c}", "nonstream", c, m, r, ms, 3, 1.0)
    if n is not None:
        versus(f"CPU µs per SSE event, n={n}", "stream", n, m, r, us, 1, 1.0)
        x, y = get("stream", n, m, "ttfb_p50_ms"), get("stream", n, r, "ttfb_p50_ms")
        d = None if x is None or y is None else x - y
        row(f"stream TTFB p50, n={n} (ms; difference)", f"{fmt(x)} vs {fmt(y)} ({d:+.2f} ms)" if d is not None else "-",
            div(x, y), "≤ +1 ms", None if d is None else d <= 1.0)
    for lv in levels_hold[:1]:
        held, done = get("hold", lv, m, "held_peak"), get("hold", lv, m, "completed")
        errs, kb = get("hold", lv, m, "errors"), get("hold", lv, m, "kb_per_stream")
        kb_ref = get("hold", lv, r, "kb_per_stream")
        ok = held is not None and done == lv and errs == 0
        row(f"{lv} held slow streams: open at once / completed / errors", f"{held} / {done} / {errs}", None,
            f"{lv} complete, 0 errors", ok)
        row("KB RSS per open stream (vs the bare proxy)", f"{fmt(kb, 1)} vs {fmt(kb_ref, 1)}", div(kb, kb_ref),
            "≤ 45 KB", None if kb is None else kb <= 45.0)
    # the cost of a feature: the same config with it (first) and without it (second), in the same run
    for with_it, without, what, most in ((m, "ccm-nousage", "usage tracking on/off", 1.10),
                                         ("ccm-limits", m, "limits on every user / none", 1.05),
                                         (m, "ccm-nometrics", "metrics on/off", 1.05)):
        if c is not None and ("nonstream", c, with_it) in summary and ("nonstream", c, without) in summary:
            versus(f"{what}, CPU ms/request c={c}", "nonstream", c, with_it, without, ms, 3, most)
            if n is not None:
                versus(f"{what}, CPU µs/event n={n}", "stream", n, with_it, without, us, 1, most)
    for first, twin in twins.items():  # two processes of one config: how far apart this run measures them
        if c is not None and ("nonstream", c, twin) in summary:
            x, y = summary[("nonstream", c, first)].get(ms), summary[("nonstream", c, twin)].get(ms)
            row(f"{first} / {twin} (one config, two processes), CPU ms/request c={c}",
                f"{fmt(x, 3)} vs {fmt(y, 3)}" + paired("nonstream", c, first, twin, ms, pool=False), div(x, y),
                "-", None)
    if c is not None and ("nonstream", c, "ccm-redis") in summary:  # shared state: an absolute goal, per request
        x, y = get("nonstream", c, "ccm-redis", ms), get("nonstream", c, m, ms)
        d = None if x is None or y is None else x - y
        row(f"shared state on Redis / none, CPU ms/request c={c} (difference)",
            f"{fmt(x, 3)} vs {fmt(y, 3)} ({d:+.3f} ms)" if d is not None else "-", div(x, y), "≤ +0.1 ms",
            None if d is None else d <= 0.1)
    for lv in sorted(levels_ns):
        x, y = get("nonstream", lv, "gunicorn-w2", "rps"), get("nonstream", lv, "gunicorn-w1", "rps")
        if x is None or y is None:
            continue
        q = div(x, y)
        row(f"gunicorn -w 2 / -w 1 req/s, c={lv}",
            f"{fmt(x, 0)} vs {fmt(y, 0)}" + paired("nonstream", lv, "gunicorn-w2", "gunicorn-w1", "rps"), q,
            "≥ 1.40", None if q is None else q >= 1.4)

    print(f"## ccm-wsgi benchmark targets ({meta.get('date_utc')})\n")
    print(f"- machine: {meta.get('cpus')} CPUs {meta.get('cpu_model')}, kernel {meta.get('kernel')}, "
          f"python {meta.get('python')}, gevent {meta.get('gevent')}, {meta.get('wrk', 'python client')}")
    print(f"- host: {platform.node()}; results: {os.path.abspath(a.json)}")
    print(f"- load: phases {cfg.get('phases')}, c={cfg.get('concurrency')} for {cfg.get('duration')} s, "
          f"streams {cfg.get('streams')} x {cfg.get('events')} events, hold {cfg.get('hold_streams')} over "
          f"{cfg.get('hold_ramp')} s ramp, repeat {cfg.get('repeat')} (median)\n")
    print("Ratio: of the medians over the repeats (the verdict); per repeat: the same ratio within each repeat.\n")
    print(f"| target | {m} vs {r} (or as named) | ratio | goal | |")
    print("| --- | --- | ---: | --- | --- |")
    for line in rows:
        print(line)
    if a.out_dir:
        tables = sorted(f for f in os.listdir(a.out_dir) if f.startswith("table-"))
        if tables:
            print(f"\nfull table: {os.path.join(a.out_dir, tables[-1])}")


if __name__ == "__main__":
    main()
