#!/usr/bin/env python3
"""Streaming soak: is ccm-wsgi's memory flat under hours-like load? (`sh tests/bench/run.sh soak`)

Starts the harness's fake upstream (--strict-tokens) and one `ccm-wsgi serve` with the benchmark config
(two users, usage tracking, access log), then keeps --streams SSE streams open back to back (each
--events deltas --delay-ms apart, i.e. about 1 s) plus one non-streaming request in --mix, for
--duration seconds. The proxy's RSS (VmRSS) is sampled every --sample seconds. Verdict: RSS growth
from the end of the warm-up (--warmup seconds) to the end, in %, and the slope over the rest of the
run. After a graceful stop (SIGTERM: usage folded into the file) the usage file must count every
request that was answered 200. Everything is bounded: the duration, a deadline, socket timeouts.

Writes soak-<stamp>.json (all samples) and prints a summary; exit status 1 when growth >= --max-growth.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, here)
import genconfig  # noqa: E402


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmRSS:"):
                return int(line.split()[1])
    return 0


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat", "rb") as f:
        rest = f.read().rsplit(b")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"process {proc.args} exited during start-up")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            gevent.sleep(0.1)
    raise SystemExit(f"nothing listens on port {port} after {timeout}s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench-dir", required=True, help="the harness directory (fake_upstream.py, load.py)")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--duration", type=float, default=600.0)
    p.add_argument("--warmup", type=float, default=60.0)
    p.add_argument("--streams", type=int, default=100)
    p.add_argument("--events", type=int, default=50)
    p.add_argument("--delay-ms", type=float, default=20.0)
    p.add_argument("--mix", type=int, default=10, help="one non-streaming request per this many streams")
    p.add_argument("--sample", type=float, default=5.0)
    p.add_argument("--max-growth", type=float, default=10.0, help="percent")
    a = p.parse_args()
    sys.path.insert(0, a.bench_dir)
    import load  # the harness's HTTP/1.1 client (Conn), request builder and message bodies

    os.makedirs(a.out_dir, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    up_port, port = free_port(), free_port()
    upstream_url = f"http://127.0.0.1:{up_port}"
    cfg = subprocess.run([sys.executable, os.path.join(here, "genconfig.py"), "--dir", a.out_dir, "--name", "soak",
                          "--port", str(port), "--upstream", upstream_url], check=True, capture_output=True,
                         text=True).stdout.strip()
    procs: list[subprocess.Popen] = []

    def start(args: list[str], log: str) -> subprocess.Popen:
        with open(os.path.join(a.out_dir, log), "ab") as f:
            proc = subprocess.Popen(args, stdout=f, stderr=f, start_new_session=True)
        procs.append(proc)
        return proc

    def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, wait: float = 30.0) -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
            try:
                proc.wait(wait)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)

    try:
        upstream = start([sys.executable, os.path.join(a.bench_dir, "fake_upstream.py"), "--port", str(up_port),
                          "--strict-tokens"], "soak-upstream.log")
        wait_port(up_port, upstream)
        proxy = start([sys.executable, "-m", "ccm_wsgi", "serve", "-c", cfg], "soak-ccm.log")
        wait_port(port, proxy)
        token = genconfig.USER_TOKENS["alice"]
        headers = [("anthropic-version", "2023-06-01"), ("x-api-key", token), ("x-fake-events", str(a.events)),
                   ("x-fake-delay-ms", str(a.delay_ms))]
        stream_req = load.build_request("127.0.0.1", port, "/v1/messages", load.messages_body(1000, True), headers)
        whole_req = load.build_request("127.0.0.1", port, "/v1/messages", load.messages_body(1000, False), headers)
        counts = {"streams": 0, "whole": 0, "ok": 0, "errors": 0, "incomplete": 0}
        t0 = time.monotonic()
        stop_at = t0 + a.duration

        def client(i: int) -> None:
            conn = None
            n = i
            while time.monotonic() < stop_at:
                n += 1
                streaming = n % a.mix != 0
                try:
                    if conn is None or not conn.alive:
                        conn = load.Conn("127.0.0.1", port, 30.0)
                    status, _, _, _, deltas, stopped = conn.request(stream_req if streaming else whole_req,
                                                                    count=streaming)
                    counts["streams" if streaming else "whole"] += 1
                    if status != 200:
                        counts["errors"] += 1
                    elif streaming and (deltas != a.events or not stopped):
                        counts["incomplete"] += 1
                    else:
                        counts["ok"] += 1
                except Exception:
                    counts["errors"] += 1
                    if conn is not None:
                        conn.close()
                    conn = None
                    gevent.sleep(0.1)

        samples: list[dict] = []

        def sampler() -> None:
            while True:
                samples.append({"t": round(time.monotonic() - t0, 1), "rss_kb": rss_kb(proxy.pid),
                                "cpu_s": round(cpu_s(proxy.pid), 2), **counts})
                gevent.sleep(a.sample)

        sg = gevent.spawn(sampler)
        # starts spread over one stream length, so about --streams are open at any time
        spread = a.events * a.delay_ms / 1000.0
        greenlets = []
        for i in range(a.streams):
            greenlets.append(gevent.spawn(client, i))
            gevent.sleep(spread / a.streams)
        gevent.joinall(greenlets, timeout=a.duration + 60)
        gevent.killall(greenlets, timeout=5)
        sg.kill()
        samples.append({"t": round(time.monotonic() - t0, 1), "rss_kb": rss_kb(proxy.pid),
                        "cpu_s": round(cpu_s(proxy.pid), 2), **counts})
        stop(proxy)  # graceful: folds usage into the file
        with open(os.path.join(a.out_dir, "soak.usages.json")) as f:
            usage = json.load(f)
        recorded = sum(c["total"]["request_count"] for c in usage.get("combinations", []))
    finally:
        for proc in reversed(procs):
            stop(proc)

    after = [s for s in samples if s["t"] >= a.warmup]
    base = after[0]["rss_kb"] if after else samples[0]["rss_kb"]
    end = samples[-1]["rss_kb"]
    peak = max(s["rss_kb"] for s in after) if after else end
    growth = 100.0 * (end - base) / base if base else 0.0
    slope = 0.0
    if len(after) >= 2:
        n = len(after)
        mt = sum(s["t"] for s in after) / n
        mr = sum(s["rss_kb"] for s in after) / n
        var = sum((s["t"] - mt) ** 2 for s in after)
        slope = 60.0 * sum((s["t"] - mt) * (s["rss_kb"] - mr) for s in after) / var if var else 0.0
    total = counts["streams"] + counts["whole"]
    result = {
        "date_utc": stamp, "duration_s": a.duration, "warmup_s": a.warmup, "streams": a.streams,
        "events": a.events, "delay_ms": a.delay_ms, "requests": total, "counts": counts,
        "usage_request_count": recorded, "rss_kb_start": samples[0]["rss_kb"], "rss_kb_after_warmup": base,
        "rss_kb_peak_after_warmup": peak, "rss_kb_end": end, "growth_pct": round(growth, 2),
        "slope_kb_per_min": round(slope, 1), "proxy_cpu_s": samples[-1]["cpu_s"], "samples": samples,
    }
    path = os.path.join(a.out_dir, f"soak-{stamp}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    ok = growth < a.max_growth and counts["errors"] == 0 and counts["incomplete"] == 0 and recorded == counts["ok"]
    print(f"soak {a.duration:.0f} s, {a.streams} streams x {a.events} events x {a.delay_ms:g} ms + 1/{a.mix} "
          f"non-streaming: {total} requests ({counts['streams']} streams), {counts['errors']} errors, "
          f"{counts['incomplete']} incomplete; usage file counts {recorded} of {counts['ok']} answered")
    print(f"RSS: start {samples[0]['rss_kb'] / 1024:.1f} MB, after {a.warmup:.0f} s warm-up {base / 1024:.1f} MB, "
          f"peak {peak / 1024:.1f} MB, end {end / 1024:.1f} MB: growth {growth:+.1f} % (limit {a.max_growth:g} %), "
          f"slope {slope:+.1f} KB/min; proxy CPU {samples[-1]['cpu_s']:.0f} s")
    print(("PASS" if ok else "FAIL") + f" ({path})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
