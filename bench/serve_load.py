"""Load test of `sdrt serve`: N concurrent clients for a bounded time against a real server subprocess.

    python -m sdrt.bench.serve_load tiny --clients 32 --seconds 180 --max-batch 8
    python -m sdrt.bench.serve_load ENGINE_DIR --clients 8 --seconds 10 --out bench/results/cpu-serve-load-x

`tiny` exports a tiny SD 1.5 pipeline (random weights; sdrt.export.models.tiny) into the work folder first. The server
runs on 127.0.0.1 with a free port; each client sends `POST /v1/images/generations` (one image, its own prompt and
seed) as soon as its previous one is answered, until `--seconds` have passed; then the requests in flight finish,
the server gets SIGTERM and must exit 0. Reported: requests sent / answered (200) / failed (an HTTP error) / lost
(no HTTP answer at all), latency percentiles, images/s, the engine batch sizes the server ran (from its /metrics
histogram), and the server's RSS (psutil) when ready, after the warm-up phase (the first 10 % of the run, at least
5 s: ONNX Runtime's arenas grow to the batch shapes then) and at the end. Goal: 0 lost, RSS growth under 5 % from
the warm-up mark to the end. result.json and result.md go to --out (default bench/results/cpu-serve-load-<model>-
b<max-batch>-c<clients>); --baseline RESULT.json adds the throughput ratio to that run (the batching gain).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

SCHEMA = "sdrt-serve-load/1"


# ---- the server ---------------------------------------------------------------------------------------------

class ServerProcess:
    """`sdrt serve` in a subprocess on 127.0.0.1 and a free port; its stderr goes to `log`."""

    def __init__(self, engine_dir: Path, log: Path, max_batch: int, max_wait_ms: float, queue_size: int,
                 backend: str = "ort-cpu", extra: tuple[str, ...] = (), start_timeout: float = 180.0):
        self.log_path = log
        self._log = open(log, "w", encoding="utf-8")
        self.command = [sys.executable, "-m", "sdrt.cli.main", "serve", str(engine_dir), "--host", "127.0.0.1",
                        "--port", "0", "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms),
                        "--queue-size", str(queue_size), "--backend", backend, "--log-level", "warning", *extra]
        self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=self._log, text=True,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.url = self._read_url(start_timeout)

    def _read_url(self, timeout: float) -> str:
        found: list[str] = []

        def read():
            for line in self.process.stdout:
                match = re.search(r"http://127\.0\.0\.1:\d+", line)
                if match:
                    found.append(match.group(0))
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout)
        if not found:
            self.kill()
            raise RuntimeError(f"sdrt serve printed no URL within {timeout:.0f} s; see {self.log_path}")
        return found[0]

    def wait_ready(self, timeout: float = 180.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"sdrt serve exited with {self.process.returncode}; see {self.log_path}")
            try:
                if httpx.get(self.url + "/readyz", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"sdrt serve was not ready within {timeout:.0f} s")

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss(self) -> int | None:
        try:
            import psutil

            return psutil.Process(self.pid).memory_info().rss
        except Exception:  # noqa: BLE001 — gone, or psutil missing
            return None

    def stop(self, timeout: float = 120.0) -> int | None:
        """SIGTERM, then wait (bounded); the exit status, or None when it had to be killed."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)


# ---- /metrics ----------------------------------------------------------------------------------------------------

def parse_metrics(text: str) -> dict[str, float]:
    """`name{labels} value` lines → {"name{labels}": value} (comments dropped)."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        try:
            out[key] = float(value)
        except ValueError:
            continue
    return out


def batch_sizes(before: dict[str, float], after: dict[str, float]) -> dict[int, int]:
    """Batches per image count between two scrapes, from the sdrt_batch_images histogram (integer buckets)."""
    def cumulative(m):
        return {float(re.search(r'le="([^"]+)"', k).group(1)): v for k, v in m.items()
                if k.startswith("sdrt_batch_images_bucket")}

    a, b = cumulative(before), cumulative(after)
    edges = sorted(e for e in b if e != float("inf"))
    out, previous = {}, 0.0
    for edge in edges:
        count = (b.get(edge, 0) - a.get(edge, 0)) - previous
        previous += count
        if count:
            out[int(edge)] = int(count)
    return out


# ---- the clients ----------------------------------------------------------------------------------------------

async def _drive(url: str, clients: int, seconds: float, body: dict, request_timeout: float,
                 on_tick=None) -> list[dict]:
    import httpx

    stop_at = time.monotonic() + seconds
    records: list[dict] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=request_timeout, limits=limits) as client:
        async def one_client(c: int):
            i = 0
            while time.monotonic() < stop_at:
                payload = {**body, "prompt": f"{body['prompt']} #{c}-{i}", "seed": c * 100_000 + i}
                started = time.monotonic()
                record = {"client": c, "start": started, "status": None, "images": 0}
                try:
                    response = await client.post("/v1/images/generations", json=payload)
                    record["status"] = response.status_code
                    if response.status_code == 200:
                        record["images"] = len(response.json()["data"])
                    else:
                        record["error"] = response.text[:300]
                except Exception as e:  # noqa: BLE001 — no HTTP answer: lost
                    record["error"] = f"{type(e).__name__}: {e}"
                record["end"] = time.monotonic()
                records.append(record)
                i += 1

        async def ticker():
            while time.monotonic() < stop_at:
                await asyncio.sleep(1.0)
                if on_tick is not None:
                    on_tick()

        await asyncio.gather(ticker(), *(one_client(c) for c in range(clients)))
    return records


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def run_load(engine_dir: Path, clients: int = 32, seconds: float = 180.0, max_batch: int = 8,
             max_wait_ms: float = 10.0, size: int = 32, steps: int = 4, guidance: float = 5.0,
             sampler: str = "euler_a", request_timeout: float = 300.0, backend: str = "ort-cpu",
             log_dir: Path | None = None, progress=lambda text: None) -> dict:
    """Start the server, drive it, stop it; the measurements (no files written)."""
    import httpx

    log_dir = Path(log_dir or ".")
    log_dir.mkdir(parents=True, exist_ok=True)
    queue_size = max(64, 2 * clients)
    server = ServerProcess(engine_dir, log_dir / "server.log", max_batch, max_wait_ms, queue_size, backend)
    exit_code = None
    try:
        server.wait_ready()
        rss_ready = server.rss()
        metrics_before = parse_metrics(httpx.get(server.url + "/metrics", timeout=30).text)
        body = {"prompt": "a load test", "size": f"{size}x{size}", "steps": steps, "guidance_scale": guidance,
                "sampler": sampler, "n": 1}
        warm_mark = max(5.0, 0.1 * seconds)
        samples: list[tuple[float, int | None]] = []
        began = time.monotonic()
        rss_warm: list[int | None] = []

        def tick():
            elapsed = time.monotonic() - began
            rss = server.rss()
            samples.append((round(elapsed, 1), rss))
            if not rss_warm and elapsed >= warm_mark:
                rss_warm.append(rss)
            if int(elapsed) % 10 == 0:
                progress(f"{elapsed:.0f}/{seconds:.0f} s, RSS {rss / 2**20 if rss else float('nan'):.0f} MiB")

        records = asyncio.run(_drive(server.url, clients, seconds, body, request_timeout, tick))
        finished = time.monotonic()
        rss_end = server.rss()
        metrics_after = parse_metrics(httpx.get(server.url + "/metrics", timeout=30).text)
        exit_code = server.stop()
    finally:
        if server.process.poll() is None:
            server.kill()
    ok = [r for r in records if r["status"] == 200]
    failed = [r for r in records if r["status"] is not None and r["status"] != 200]
    lost = [r for r in records if r["status"] is None]
    latencies = [r["end"] - r["start"] for r in ok]
    images = sum(r["images"] for r in ok)
    wall = (max(r["end"] for r in records) - began) if records else 0.0
    sizes = batch_sizes(metrics_before, metrics_after)
    batches = sum(sizes.values())
    start_rss = rss_warm[0] if rss_warm else rss_ready
    wait_sum = metrics_after.get("sdrt_queue_wait_seconds_sum", 0) - metrics_before.get("sdrt_queue_wait_seconds_sum", 0)
    wait_count = metrics_after.get("sdrt_queue_wait_seconds_count", 0) - \
        metrics_before.get("sdrt_queue_wait_seconds_count", 0)
    return {
        "requests": {"sent": len(records), "answered": len(ok), "failed": len(failed), "lost": len(lost),
                     "failures": sorted({r.get("error", "")[:200] for r in failed + lost})[:10]},
        "latency_s": {"p50": _percentile(latencies, 0.5), "p90": _percentile(latencies, 0.9),
                      "p99": _percentile(latencies, 0.99), "max": max(latencies) if latencies else None,
                      "mean": statistics.fmean(latencies) if latencies else None},
        "images": images,
        "wall_s": round(wall, 2),
        "load_s": round(finished - began, 2),
        "images_per_s": images / wall if wall else None,
        "batches": {"count": batches, "by_images": {str(k): v for k, v in sorted(sizes.items())},
                    "mean_images": (sum(k * v for k, v in sizes.items()) / batches) if batches else None},
        "server_queue_wait_mean_s": wait_sum / wait_count if wait_count else None,
        "rss_bytes": {"ready": rss_ready, "after_warmup": start_rss, "end": rss_end,
                      "warmup_mark_s": warm_mark, "samples": samples},
        "rss_growth": (rss_end / start_rss - 1.0) if rss_end and start_rss else None,
        "server": {"command": server.command, "exit_code": exit_code, "queue_size": queue_size},
        "settings": {"clients": clients, "seconds": seconds, "max_batch": max_batch, "max_wait_ms": max_wait_ms,
                     "size": size, "steps": steps, "guidance": guidance, "sampler": sampler, "backend": backend,
                     "request_timeout_s": request_timeout},
    }


# ---- the report -----------------------------------------------------------------------------------------------

def _mib(value) -> str:
    return "n/a" if value is None else f"{value / 2**20:,.1f} MiB"


def _ms(value) -> str:
    return "n/a" if value is None else f"{value * 1000:,.0f} ms"


def markdown(result: dict) -> str:
    r, s, lat, rss = result["requests"], result["settings"], result["latency_s"], result["rss_bytes"]
    m = result["machine"]
    lines = [
        f"# sdrt serve load — {result['model']['name']}, {s['clients']} clients, max batch {s['max_batch']}",
        "",
        f"- command: `{result['command']}`",
        f"- server: `{' '.join(shlex.quote(c) for c in result['server']['command'])}` (exit status after SIGTERM: "
        f"{result['server']['exit_code']})",
        f"- request: `POST /v1/images/generations`, one {s['size']}x{s['size']} image, {s['steps']} steps "
        f"{s['sampler']}, guidance {s['guidance']}, own prompt and seed per request; each client sends its next "
        f"request when the previous is answered, for {s['seconds']:g} s",
        f"- model: `{result['model']['engine_dir']}` ({result['model']['note']})",
        f"- machine: {m['cpu']}, {m['cores_logical']} logical cores, {m['memory_gib']} GiB; load average before / "
        f"after: {result['conditions']['load_average_before']} / {result['conditions']['load_average_after']}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in result['versions'].items())}",
        f"- created: {result['created']}",
        "",
        "| figure | value |",
        "|---|---:|",
        f"| requests sent | {r['sent']} |",
        f"| answered (200) | {r['answered']} |",
        f"| failed (HTTP error) | {r['failed']} |",
        f"| lost (no answer) | {r['lost']} |",
        f"| latency p50 / p90 / p99 / max | {_ms(lat['p50'])} / {_ms(lat['p90'])} / {_ms(lat['p99'])} / "
        f"{_ms(lat['max'])} |",
        f"| images/s | {result['images_per_s']:.2f} |" if result["images_per_s"] else "| images/s | n/a |",
        f"| engine batches (images: count) | {', '.join(f'{k}: {v}' for k, v in result['batches']['by_images'].items())} |",
        f"| mean images per batch | {result['batches']['mean_images']:.2f} |" if result["batches"]["mean_images"]
        else "| mean images per batch | n/a |",
        f"| server queue wait (mean) | {_ms(result['server_queue_wait_mean_s'])} |",
        f"| server RSS ready / after warm-up ({rss['warmup_mark_s']:g} s) / end | {_mib(rss['ready'])} / "
        f"{_mib(rss['after_warmup'])} / {_mib(rss['end'])} |",
        f"| RSS growth warm-up → end | {result['rss_growth'] * 100:+.2f} % |" if result["rss_growth"] is not None
        else "| RSS growth | n/a |",
    ]
    if result.get("baseline"):
        b = result["baseline"]
        lines += ["", f"Batching gain: {result['images_per_s']:.2f} / {b['images_per_s']:.2f} images/s = "
                      f"**{b['gain']:.2f}x** over `{b['path']}` (max batch {b['max_batch']})."]
    goals = [f"lost = {r['lost']} (goal 0)",
             "RSS growth " + (f"{result['rss_growth'] * 100:+.2f} %" if result["rss_growth"] is not None else "n/a")
             + " (goal under 5 %)"]
    lines += ["", "Goals: " + "; ".join(goals) + "."]
    if r["failures"]:
        lines += ["", "Failures:", *[f"- `{f}`" for f in r["failures"]]]
    return "\n".join(lines) + "\n"


def _tiny_engine(workdir: Path) -> Path:
    out = workdir / "tiny-sd15-fp32"
    if (out / "manifest.json").exists():
        return out
    from sdrt.export.exporter import ExportConfig, export
    from sdrt.export.models.tiny import write_tiny_pipeline

    source = workdir / "tiny-sd15-source"
    if not source.exists():
        write_tiny_pipeline("sd15", source)
    export(ExportConfig(model=str(source), output=out, precision="fp32"))
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m sdrt.bench.serve_load", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="engine directory, or `tiny` (a tiny SD 1.5 exported into --workdir)")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=180.0)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--sampler", default="euler_a")
    p.add_argument("--backend", default="ort-cpu")
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--workdir", type=Path, default=Path("build/serve-load"))
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--baseline", type=Path, default=None, help="result.json of another run: adds the throughput ratio")
    a = p.parse_args(argv)
    if a.clients < 1 or a.seconds <= 0 or a.max_batch < 1 or a.seconds > 3600:
        p.error("--clients and --max-batch must be at least 1, --seconds in (0, 3600]")
    from sdrt.bench.machine import load_average, machine_info, versions

    a.workdir.mkdir(parents=True, exist_ok=True)
    engine_dir = _tiny_engine(a.workdir) if a.model == "tiny" else Path(a.model)
    name = "tiny" if a.model == "tiny" else engine_dir.name
    out = a.out or Path("bench/results") / f"cpu-serve-load-{name}-b{a.max_batch}-c{a.clients}"
    out.mkdir(parents=True, exist_ok=True)
    load_before = load_average()
    result = run_load(engine_dir, a.clients, a.seconds, a.max_batch, a.max_wait_ms, a.size, a.steps, a.guidance,
                      a.sampler, a.request_timeout, a.backend, log_dir=a.workdir / out.name,
                      progress=lambda text: print(text, file=sys.stderr, flush=True))
    result = {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m sdrt.bench.serve_load " + " ".join(shlex.quote(x) for x in argv),
        "model": {"name": name, "engine_dir": str(engine_dir),
                  "note": "tiny SD 1.5 with random weights (sdrt.export.models.tiny), fp32 ONNX" if a.model == "tiny"
                  else "engine directory"},
        "machine": machine_info(),
        "conditions": {"load_average_before": load_before, "load_average_after": load_average()},
        "versions": versions() | _serve_versions(),
        **result,
    }
    if a.baseline:
        base = json.loads(a.baseline.read_text())
        result["baseline"] = {"path": str(a.baseline), "images_per_s": base["images_per_s"],
                              "max_batch": base["settings"]["max_batch"],
                              "gain": result["images_per_s"] / base["images_per_s"]}
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "result.md").write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {out / 'result.json'} and {out / 'result.md'}", file=sys.stderr)
    return 0 if result["requests"]["lost"] == 0 else 1


def _serve_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("fastapi", "uvicorn", "prometheus-client", "httpx"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out


if __name__ == "__main__":
    sys.exit(main())
