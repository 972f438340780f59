#!/usr/bin/env python3
"""Sluice's benchmark suite: one command, one Markdown report.

Every comparison runs both sides in this one invocation on this one machine,
alternating which goes first, ROUNDS rounds, and reports each side's median
and the median of the rounds' own ratios (only a round's two measurements
share the machine's state; these shared machines drift by tens of percent
over minutes). Sections:

  fanin    Broker fan-in: the same load generator (`sluice-sim`, rate 0, as
           fast as each broker takes it) against Mosquitto (the Debian
           package, started here on a free port, persistence off) and
           against Sluice on the null sink (`ingest.discard`: edge, spool,
           rules, everything but PostgreSQL), QoS 0 and 1, 10/100/1000
           devices. QoS 1 counts acknowledged messages; QoS 0 what the
           publishers wrote.
  ceiling  Sluice end to end vs binary COPY of the same points into the same
           schema (`e2e_ingest.sh`, which runs its own rounds), at 5 and 21
           points per message.
  rules    Rule cost: the built-in decoder vs a pass-through WASM rule (the
           C SDK's `convert` example) vs a stateful WASM rule (its
           `average` example), messages/s end to end (until the spool holds
           nothing unwritten), with storage and with the null sink.
  idle     Connection scale: RSS and CPU of Sluice and of Mosquitto with
           1,000 and 10,000 idle connected devices.
  latency  publish→PUBACK and publish→stored percentiles at 25/50/75% of the
           sustained maximum (the rate Sluice stored while the load
           generator ran, from `ceiling`, or measured here if it was skipped).

Usage: simulator/bench/suite.py [--rounds N] [--quick] [--only SECTION,...]
                                [--out FILE]
Needs: mosquitto (apt-get install -y mosquitto), clang and lld (the WASM
rules), PostgreSQL 15 binaries, a hard file-descriptor limit of at least
12,000 for the 10,000-connection case (it is skipped with a note otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "release"
SIM = BIN / "sluice-sim"
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def log(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def fmt_int(x: float) -> str:
    return f"{x:,.0f}" if x == x else "–"


def fmt_ratio(x: float) -> str:
    return f"{x:.2f}×" if x == x else "–"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_idle(pid: int, timeout: float = 300) -> float:
    """Waits until a process has used under 10% of a core for half a second;
    returns when that quiet half second began. A broker can still be reading
    QoS 0 messages out of its socket buffers long after the publishers
    finished writing them."""
    deadline = time.monotonic() + timeout
    window = 0.5
    while time.monotonic() < deadline:
        start, c0 = time.monotonic(), cpu_seconds(pid)
        time.sleep(window)
        if cpu_seconds(pid) - c0 < 0.1 * window:
            return start
    raise RuntimeError(f"process {pid} stayed busy for {timeout} s")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


# --------------------------------------------------------------------------
# The two brokers


class Sluice:
    """A release `sluice serve --allow-anonymous` (publish rate limit off)
    with its managed PostgreSQL in WORK/data, reused by every start."""

    def __init__(self, work: Path):
        self.work = work
        self.log_path = work / "sluice.log"
        self.mqtt, self.ws, self.grpc, self.metrics = (free_port() for _ in range(4))
        self.proc: subprocess.Popen | None = None

    def start(self, env: dict[str, str] | None = None, rules: Path | None = None) -> None:
        rules = rules or self.work / "rules"
        rules.mkdir(exist_ok=True)
        full_env = dict(os.environ)
        full_env.update({"SLUICE_BROKER__MAX_PUBLISH_RATE": "0",
                         "SLUICE_BROKER__MAX_CONNECTIONS": "12000"})
        full_env.update(env or {})
        before = self._ready_lines()
        with open(self.log_path, "a") as out:
            self.proc = subprocess.Popen(
                [str(BIN / "sluice"), "serve", "--allow-anonymous",
                 "--data-dir", str(self.work / "data"), "--rules", str(rules),
                 "--mqtt-listen", f"127.0.0.1:{self.mqtt}",
                 "--ws-listen", f"127.0.0.1:{self.ws}",
                 "--grpc-listen", f"127.0.0.1:{self.grpc}",
                 "--metrics-listen", f"127.0.0.1:{self.metrics}"],
                env=full_env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while self._ready_lines() <= before:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sluice did not start; see {self.log_path}")
            time.sleep(0.1)

    def _ready_lines(self) -> int:
        try:
            return self.log_path.read_text(errors="replace").count("sluice is ready")
        except FileNotFoundError:
            return 0

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=120)
        self.proc = None

    @property
    def pid(self) -> int:
        assert self.proc
        return self.proc.pid

    def metric(self, name: str) -> float:
        """Sum of every sample of one Prometheus metric."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics}/metrics") as r:
            text = r.read().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and line[len(name):len(name) + 1] in ("{", " "):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def drained(self, timeout: float = 600) -> float:
        """Waits until the spool holds nothing unwritten; returns when."""
        deadline = time.monotonic() + timeout
        while self.metric("sluice_spool_pending_records") > 0:
            if time.monotonic() > deadline:
                raise RuntimeError("the spool did not drain")
            time.sleep(0.05)
        return time.monotonic()


class Mosquitto:
    """Debian's mosquitto on a free port: anonymous, no persistence, no
    connection limit, logging off (as a benchmark of it would run it)."""

    def __init__(self, work: Path):
        self.port = free_port()
        self.conf = work / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
            "max_connections -1\npersistence false\nlog_dest none\n")
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)])
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("mosquitto did not start")
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
        self.proc = None

    @property
    def pid(self) -> int:
        assert self.proc
        return self.proc.pid


# --------------------------------------------------------------------------
# The load generator


def sim_command(port: int, devices: int, qos: int, duration: float, rate: float = 0,
                extra: list[str] | None = None) -> list[str]:
    return [str(SIM), "--port", str(port), "--devices", str(devices), "--rate", str(rate),
            "--qos", str(qos), "--duration", str(duration), "--connect-timeout-secs", "60",
            "--drain-timeout-secs", "60", "--json", *(extra or [])]


def run_sim(cmd: list[str]) -> dict:
    out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-2000:]}")
    return json.loads(out.stdout)


def shown(cmd: list[str]) -> str:
    """A command as the report shows it: binaries by their short name, the
    port (a free one each run) as PORT."""
    words = [Path(c).name if c.startswith("/") and "/release/" in c else c for c in cmd]
    for i in range(1, len(words)):
        if words[i - 1] == "--port":
            words[i] = "PORT"
        if words[i - 1] == "--grpc":
            words[i] = "http://127.0.0.1:GRPC_PORT"
    return " ".join(words)


# --------------------------------------------------------------------------
# The report


@dataclass
class Report:
    sections: list[str] = field(default_factory=list)
    goals: list[tuple[str, str, str, str]] = field(default_factory=list)
    # Headline figures for BENCHMARKS.md's history table, by column.
    history: dict[str, str] = field(default_factory=dict)

    def add(self, text: str) -> None:
        self.sections.append(text.rstrip() + "\n")
        log(text)

    def goal(self, what: str, target: str, measured: str, met: bool | None) -> None:
        verdict = "–" if met is None else ("**met**" if met else "**missed**")
        self.goals.append((what, target, measured, verdict))


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------
# 1. Broker fan-in


def fanin(work: Path, rounds: int, quick: bool, report: Report) -> None:
    duration = 4 if quick else 10
    device_counts = [10, 100] if quick else [10, 100, 1000]
    sluice, mosquitto = Sluice(work), Mosquitto(work)
    sluice.start({"SLUICE_INGEST__DISCARD": "true"})
    mosquitto.start()
    rows, example = [], []
    try:
        for qos in (0, 1):
            for devices in device_counts:
                rates: dict[str, list[float]] = {"sluice": [], "mosquitto": []}
                cpu: dict[str, list[float]] = {"sluice": [], "mosquitto": []}
                ratios = []
                for r in range(rounds):
                    order = [("mosquitto", mosquitto), ("sluice", sluice)]
                    if r % 2:
                        order.reverse()
                    got = {}
                    for name, broker in order:
                        port = broker.port if name == "mosquitto" else broker.mqtt
                        cmd = sim_command(port, devices, qos, duration)
                        example = cmd
                        wait_idle(broker.pid)
                        c0, t0 = cpu_seconds(broker.pid), time.monotonic()
                        d = run_sim(cmd)
                        # QoS 0: the clock runs until the broker has read
                        # everything the publishers wrote, so that figure is
                        # what it took, not what sat in its socket buffers.
                        # QoS 1: a PUBACK means taken; the idle wait only
                        # keeps the next run clean.
                        idle_at = wait_idle(broker.pid)
                        took = d["elapsed_secs"] if qos == 1 else idle_at - t0
                        busy = cpu_seconds(broker.pid) - c0
                        count = d["acked"] if qos == 1 else d["sent"]
                        got[name] = count / took
                        rates[name].append(got[name])
                        cpu[name].append(100 * busy / max(idle_at - t0, took))
                        log(f"fan-in qos {qos} {devices} devices round {r + 1} {name}: "
                            f"{got[name]:,.0f} msg/s, broker CPU {cpu[name][-1]:.0f}%")
                    ratios.append(got["sluice"] / got["mosquitto"])
                ratio = median(ratios)
                rows.append([str(qos), f"{devices:,}", fmt_int(median(rates["mosquitto"])),
                             f"{median(cpu['mosquitto']):.0f}%", fmt_int(median(rates["sluice"])),
                             f"{median(cpu['sluice']):.0f}%", fmt_ratio(ratio),
                             ", ".join(fmt_ratio(x) for x in ratios)])
                if qos == 1:
                    report.history[f"fan-in QoS 1, {devices:,} dev"] = fmt_ratio(ratio)
                    report.goal(f"QoS 1 fan-in, {devices:,} devices", "Sluice ≥ 1.5× Mosquitto",
                                fmt_ratio(ratio), ratio >= 1.5)
    finally:
        sluice.stop()
        mosquitto.stop()
    report.add(f"""## 1. Broker fan-in

Messages per second into each broker, as fast as it takes them
(`{shown(example)}` with the broker's port, QoS and device count; each device
keeps up to 100 QoS 1 messages in flight). Sluice runs on the null sink
(`SLUICE_INGEST__DISCARD=true`): its edge, spool (fsync before each PUBACK,
as always), router and rules run, PostgreSQL is not written. Mosquitto acks
QoS 1 from memory (persistence off). QoS 1: acknowledged messages over the
simulator's run time. QoS 0: messages written over the time until the broker
had read them all (its CPU went quiet). Broker CPU: its CPU time over that
time (200% = both cores); each run starts with the broker quiet. Medians of {rounds} rounds, alternating which broker goes first.

{table(["QoS", "devices", "Mosquitto msg/s", "its CPU", "Sluice msg/s", "its CPU",
        "Sluice / Mosquitto", "each round"], rows)}
""")


# --------------------------------------------------------------------------
# 2. Ingest ceiling


@dataclass
class Ceiling:
    under_load_msgs: float = float("nan")  # messages/s stored while the sim ran


def ceiling(rounds: int, quick: bool, report: Report, result: Ceiling) -> None:
    duration = 8 if quick else 20
    rows = []
    commands = []
    for metrics in (4, 20):
        cmd = [str(ROOT / "simulator/bench/e2e_ingest.sh"), "50", str(duration), "0",
               str(metrics), str(rounds)]
        commands.append(f"`simulator/bench/e2e_ingest.sh 50 {duration} 0 {metrics} {rounds}`")
        log("running", " ".join(cmd))
        env = {k: v for k, v in os.environ.items() if k not in ("WORK", "KEEP")}
        out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, check=True)
        median_row = next(line for line in out.stdout.splitlines() if "**median of" in line)
        cells = [c.strip().strip("*") for c in median_row.strip().strip("|").split("|")]
        # date, cores, load, round, _, e2e, copy1, e2e/1, copy2, e2e/2, under load, that/2
        e2e, copy1, r1, copy2, r2, under, rl = cells[5:12]
        points = metrics + 1
        e2e, copy1, copy2, under = (fmt_int(float(x)) for x in (e2e, copy1, copy2, under))
        rows.append([str(points), e2e, copy1, r1, copy2, r2, under, rl])
        pct2 = float(r2.rstrip("%"))
        report.goal(f"end to end vs binary COPY, {points} points/msg",
                    "≥ 70% of the ceiling (2 connections, as Sluice writes on 2)",
                    f"{r2} (1 connection: {r1})", pct2 >= 70)
        report.history[f"e2e / COPY 2 conns, {points} pts/msg"] = r2
        if metrics == 4:
            result.under_load_msgs = float(under.replace(",", "")) / points
    report.add(f"""## 2. Ingest ceiling

Sluice end to end (MQTT → spool → rules → PostgreSQL, 50 devices publishing
QoS 1 as fast as acknowledged, until the last point is stored) against binary
COPY of as many points, shaped like the run's series, straight into the same
`points` table by `sluice-copy-ceiling` on 1 and on 2 connections (Sluice's
writer uses 2). Points/s, medians of {rounds} rounds; the ratios are the
medians of each round's own ratio. "While the sim ran": points committed
while the load generator was running, over its run time (the generator and
the edge take their share of the 2 cores then). Commands: {", ".join(commands)}.

{table(["points/msg", "end to end", "COPY 1 conn", "e2e / 1 conn", "COPY 2 conns",
        "e2e / 2 conns", "stored/s while the sim ran", "that / 2 conns"], rows)}
""")


# --------------------------------------------------------------------------
# 3. Rule cost


def build_rules(work: Path) -> Path:
    out = work / "wasm"
    subprocess.run([str(ROOT / "rules/sdk/c/build-examples.sh"), str(out)], check=True,
                   stdout=subprocess.DEVNULL)
    return out


def rule_dir(work: Path, wasm: Path, name: str | None) -> Path:
    d = work / f"rules-{name or 'builtin'}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    if name:
        shutil.copy(wasm / f"{name}.wasm", d / f"{name}.wasm")
        shutil.copy(ROOT / f"rules/examples/{name}/{name}.toml", d / f"{name}.toml")
    return d


def rule_cost(work: Path, rounds: int, quick: bool, report: Report) -> None:
    duration = 5 if quick else 15
    devices = 50
    wasm = build_rules(work)
    variants = [("built-in JSON decoder", None), ("pass-through WASM (`convert`)", "convert"),
                ("stateful WASM (`average`)", "average")]
    sluice = Sluice(work)
    rows = []
    example: list[str] = []
    for storage in (True, False):
        results: dict[str, list[tuple[float, float]]] = {v: [] for v, _ in variants}
        for r in range(rounds):
            order = variants if r % 2 == 0 else list(reversed(variants))
            for label, name in order:
                env = {"SLUICE_RULES__BUILTIN_TELEMETRY": "false" if name else "true"}
                if not storage:
                    env["SLUICE_INGEST__DISCARD"] = "true"
                sluice.start(env, rule_dir(work, wasm, name))
                try:
                    written0 = sluice.metric("sluice_points_written_total") + sluice.metric(
                        "sluice_records_discarded_total")
                    cmd = sim_command(sluice.mqtt, devices, 1, duration)
                    example = cmd
                    t0 = time.monotonic()
                    d = run_sim(cmd)
                    done = sluice.drained()
                    rate = d["acked"] / (done - t0)
                    rows_out = (sluice.metric("sluice_points_written_total")
                                + sluice.metric("sluice_records_discarded_total") - written0)
                finally:
                    sluice.stop()
                results[label].append((rate, rows_out / max(d["acked"], 1)))
                log(f"rules {label} storage={storage} round {r + 1}: {rate:,.0f} msg/s")
        for label, _ in variants:
            rate = median([x[0] for x in results[label]])
            ratio = median([a[0] / b[0] for a, b in zip(results[label], results[variants[0][0]])])
            rows.append(["PostgreSQL" if storage else "null sink", label, fmt_int(rate),
                         f"{median([x[1] for x in results[label]]):.2f}",
                         "1" if label == variants[0][0] else f"{ratio:.2f}"])
    report.add(f"""## 3. Rule cost

Messages per second end to end: {devices} devices publish QoS 1 as fast as
acknowledged for {duration} s (`{shown(example)}`), and the clock stops
when the spool holds nothing unwritten (every message through its rule and
committed, or discarded by the null sink). One rule on `devices/+/telemetry`
at a time: the built-in decoder, or the C SDK's `convert` example (every
numeric field to a point, converting units: a pass-through), or its
`average` example (per-device state updated with every message, averages
emitted once a minute), built by `rules/sdk/c/build-examples.sh`. Rows out
per message: points written (or discarded). Medians of {rounds} rounds,
alternating the order; "vs built-in" is the median of each round's ratio.

{table(["storage", "rule", "messages/s", "rows out / msg", "vs built-in"], rows)}
""")


# --------------------------------------------------------------------------
# 4. Connection scale


def idle(work: Path, rounds: int, quick: bool, report: Report) -> None:
    counts = [1000] if quick else [1000, 10000]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    rows = []
    notes = []
    brokers = [("Mosquitto", Mosquitto(work)), ("Sluice", Sluice(work))]
    for n in counts:
        want = n + 1024
        if hard != resource.RLIM_INFINITY and hard < want:
            notes.append(f"{n:,} connections skipped: the hard file-descriptor limit is {hard}.")
            continue
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
        runs: dict[str, list[IdleRun]] = {name: [] for name, _ in brokers}
        for r in range(rounds):
            for name, broker in (brokers if r % 2 == 0 else list(reversed(brokers))):
                runs[name].append(idle_run(broker, n))
                log(f"idle {n} round {r + 1} {name}: {runs[name][-1]}")
        for name, _ in brokers:
            per = median([x.per_connection for x in runs[name]])
            rows.append([name, f"{n:,}", "/".join(f"{x.connected:,}" for x in runs[name]),
                         fmt_int(median([x.before for x in runs[name]])),
                         fmt_int(median([x.with_them for x in runs[name]])),
                         f"{per:.1f}", ", ".join(f"{x.per_connection:.1f}" for x in runs[name]),
                         f"{median([x.cpu_percent for x in runs[name]]):.1f}%"])
            if name == "Sluice":
                report.history[f"KiB per idle conn, {n:,}"] = f"{per:.1f}"
                report.goal(f"memory per idle connection, {n:,} devices", "≤ 16 KiB",
                            f"{per:.1f} KiB", per <= 16)
    report.add(f"""## 4. Connection scale

Each broker alone, freshly started: 10 warm-up devices, then N devices
connect over the ramp (`sluice-sim --devices N --rate 0.001 --ramp-ms 10000`,
2000 for 1,000 devices, so each publishes one QoS 1 message and then idles
with a 30 s keep-alive). RSS before and with them; per connection = the
difference over the connections established; CPU = the broker's CPU time
over 10 s of that idleness. Medians of {rounds} rounds, alternating which
broker goes first. {" ".join(notes)}

{table(["broker", "devices", "connected (each round)", "RSS before KiB", "RSS with them KiB",
        "KiB per connection", "each round", "CPU while idle"], rows)}
""")


@dataclass
class IdleRun:
    connected: int
    before: int
    with_them: int
    cpu_percent: float

    @property
    def per_connection(self) -> float:
        return (self.with_them - self.before) / max(self.connected, 1)

    def __str__(self) -> str:
        return (f"{self.connected} connected, {self.before} → {self.with_them} KiB, "
                f"{self.per_connection:.1f} KiB each, CPU {self.cpu_percent:.1f}%")


def idle_run(broker: Sluice | Mosquitto, n: int) -> IdleRun:
    """One broker start with N idle devices connected."""
    broker.start()
    try:
        port = broker.port if isinstance(broker, Mosquitto) else broker.mqtt
        # Warm the connection paths so the baseline is not flattered.
        run_sim(sim_command(port, 10, 1, 1, rate=1, extra=["--count", "1", "--id-prefix", "warm-"]))
        time.sleep(2)
        before = rss_kib(broker.pid)
        ramp = 10_000 if n >= 5000 else 2_000
        sim = subprocess.Popen(
            sim_command(port, n, 1, ramp / 1000 + 120, rate=0.001,
                        extra=["--ramp-ms", str(ramp), "--id-prefix", "idle-"]),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            # Every device is connected once the ramp is over plus a margin;
            # then the broker is measured over 10 s of idleness.
            time.sleep(ramp / 1000 + 5)
            c0, t0 = cpu_seconds(broker.pid), time.monotonic()
            time.sleep(10)
            cpu = 100 * (cpu_seconds(broker.pid) - c0) / (time.monotonic() - t0)
            connected = established(port)
            with_them = rss_kib(broker.pid)
        finally:
            # Ctrl-C: the devices disconnect cleanly.
            sim.send_signal(signal.SIGINT)
            sim.wait(timeout=120)
    finally:
        broker.stop()
    return IdleRun(connected, before, with_them, cpu)


def established(port: int) -> int:
    """Established TCP connections to a local port (server side)."""
    out = subprocess.run(["ss", "-Htn", "state", "established", f"( sport = :{port} )"],
                         stdout=subprocess.PIPE, text=True, check=True)
    return len([line for line in out.stdout.splitlines() if line.strip()])


# --------------------------------------------------------------------------
# 5. Latency


def latency(work: Path, rounds: int, quick: bool, report: Report, result: Ceiling) -> None:
    duration = 5 if quick else 20
    devices = 50
    sluice = Sluice(work)
    sluice.start()
    rows = []
    example: list[str] = []
    try:
        sustained = result.under_load_msgs
        how = "the rate stored while the load generator ran, from section 2"
        if sustained != sustained:  # section 2 skipped: measure it here
            before = sluice.metric("sluice_points_written_total")
            d = run_sim(sim_command(sluice.mqtt, devices, 1, duration))
            stored = sluice.metric("sluice_points_written_total") - before
            sluice.drained()
            sustained = stored / (d["points"] / max(d["sent"], 1)) / d["elapsed_secs"]
            how = "the rate stored while the load generator ran at rate 0, measured here"
        for share in (0.25, 0.5, 0.75):
            rate = sustained * share / devices
            runs = []
            for _ in range(rounds):
                cmd = sim_command(sluice.mqtt, devices, 1, duration, rate=round(rate, 2),
                                  extra=["--latency", "--grpc", f"http://127.0.0.1:{sluice.grpc}"])
                example = cmd
                runs.append(run_sim(cmd))
            ack = {k: median([r["puback_latency_ms"][k] for r in runs]) for k in ("p50", "p99")}
            st = {k: median([r["stored_latency_ms"][k] for r in runs])
                  for k in ("p50", "p90", "p99")}
            if share == 0.5:
                report.history["stored p99 at 50%, ms"] = f"{st['p99']:.0f}"
            rows.append([f"{share:.0%}", fmt_int(rate * devices), f"{ack['p50']:.1f}",
                         f"{ack['p99']:.1f}", f"{st['p50']:.1f}", f"{st['p90']:.1f}",
                         f"{st['p99']:.1f}"])
    finally:
        sluice.stop()
    report.add(f"""## 5. Latency

{devices} devices publishing QoS 1 at 25, 50 and 75% of the sustained maximum
({fmt_int(sustained)} messages/s: {how}), {duration} s each
(`{shown(example)}`, with the rate per device). publish→PUBACK is measured by
each device; publish→stored by a gRPC `Subscribe` to the run's `seq` points,
which sees a point once its batch is committed. Milliseconds, medians over
{rounds} runs of each run's percentile.

{table(["load", "messages/s", "PUBACK p50", "PUBACK p99", "stored p50", "stored p90",
        "stored p99"], rows)}
""")


# --------------------------------------------------------------------------


def version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        return out.stdout.strip().splitlines()[0]
    except (OSError, IndexError):
        return "not found"


def machine() -> str:
    mem = next(line for line in Path("/proc/meminfo").read_text().splitlines()
               if line.startswith("MemTotal"))
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor())
    pg = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))
    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                         stdout=subprocess.PIPE, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"],
                           stdout=subprocess.PIPE, text=True).stdout.strip()
    return "\n".join([
        f"- Machine: {os.cpu_count()} cores ({cpu}), "
        f"{int(mem.split()[1]) / 1024 / 1024:.1f} GiB, Linux {platform.release()}",
        f"- Sluice: commit {rev}{' with local changes' if dirty else ''}, release build",
        f"- {version(['rustc', '--version'])}",
        f"- {version([str(pg[-1]), '--version']) if pg else 'PostgreSQL: not found'}",
        f"- {version([MOSQUITTO, '-h'])}",
    ])


SECTIONS = ["fanin", "ceiling", "rules", "idle", "latency"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true",
                        help="short runs and fewer cases: checks the suite, measures little")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections of {','.join(SECTIONS)}")
    parser.add_argument("--out", type=Path,
                        default=ROOT / "target" / "bench" / f"report-{time.strftime('%Y-%m-%d-%H%M')}.md")
    parser.add_argument("--record", action="store_true",
                        help="also put the report into BENCHMARKS.md (latest report and a "
                             "history row)")
    args = parser.parse_args()
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(only) - set(SECTIONS)
    if unknown or args.rounds < 1:
        parser.error(f"unknown sections {sorted(unknown)}" if unknown else "--rounds must be ≥ 1")
    if "fanin" in only or "idle" in only:
        if not Path(MOSQUITTO).exists():
            parser.error("mosquitto not found: apt-get install -y mosquitto")

    log("building the release binaries")
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "sluice", "-p", "sluice-simulator"],
                   cwd=ROOT, check=True)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    t0 = time.monotonic()
    report = Report()
    result = Ceiling()
    work = Path(tempfile.mkdtemp(prefix="sluice-suite-"))
    work.chmod(0o755)  # the managed PostgreSQL runs as another user when we are root
    try:
        if "fanin" in only:
            fanin(work, args.rounds, args.quick, report)
        if "ceiling" in only:
            ceiling(args.rounds, args.quick, report, result)
        if "rules" in only:
            rule_cost(work, args.rounds, args.quick, report)
        if "idle" in only:
            idle(work, args.rounds, args.quick, report)
        if "latency" in only:
            latency(work, args.rounds, args.quick, report, result)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    command = "simulator/bench/suite.py " + " ".join(sys.argv[1:])
    goals = table(["goal", "target", "measured (same run)", ""],
                  [list(g) for g in report.goals])
    text = f"""# Sluice benchmark report, {started}

Command: `{command.strip()}` ({(time.monotonic() - t0) / 60:.0f} minutes,
{args.rounds} round{'s' if args.rounds > 1 else ''}{', quick' if args.quick else ''}).

{machine()}

## Goals

{goals}

{"".join(s + chr(10) for s in report.sections)}"""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    if args.record:
        record(text, report.history, started)
    print(args.out)
    return 0


HISTORY_COLUMNS = ["fan-in QoS 1, 10 dev", "fan-in QoS 1, 100 dev", "fan-in QoS 1, 1,000 dev",
                   "e2e / COPY 2 conns, 5 pts/msg", "e2e / COPY 2 conns, 21 pts/msg",
                   "KiB per idle conn, 1,000", "KiB per idle conn, 10,000",
                   "stored p99 at 50%, ms"]
LATEST_BEGIN, LATEST_END = "<!-- suite:latest:begin -->", "<!-- suite:latest:end -->"
HISTORY_MARK = "<!-- suite:history:next-row -->"


def record(text: str, history: dict[str, str], started: str) -> None:
    """Puts the report into BENCHMARKS.md as the latest one (its headings two
    levels down) and adds its headline figures to the history table."""
    path = ROOT / "BENCHMARKS.md"
    doc = path.read_text()
    if LATEST_BEGIN not in doc or LATEST_END not in doc or HISTORY_MARK not in doc:
        raise SystemExit(f"{path} lacks the suite's markers; add them first")
    nested = re.sub(r"^(#+) ", lambda m: "#" * (len(m.group(1)) + 2) + " ", text, flags=re.M)
    head, rest = doc.split(LATEST_BEGIN, 1)
    _, tail = rest.split(LATEST_END, 1)
    doc = f"{head}{LATEST_BEGIN}\n{nested.strip()}\n{LATEST_END}{tail}"
    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                         stdout=subprocess.PIPE, text=True).stdout.strip()
    row = "| " + " | ".join([started.split()[0], rev, f"{os.cpu_count()} cores"]
                            + [history.get(c, "–") for c in HISTORY_COLUMNS]) + " |"
    doc = doc.replace(HISTORY_MARK, f"{row}\n{HISTORY_MARK}")
    path.write_text(doc)
    log(f"recorded in {path}")


if __name__ == "__main__":
    sys.exit(main())
