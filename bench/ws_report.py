"""What `bench.ws` derives and prints: x nginx, added latency, CPU per round trip, the
idle connections' memory, each system against Switchboard, and issue 5's goals."""

from __future__ import annotations

import os
from typing import Any

from bench.harness import (
    OTHER_BUSY_WARN,
    print_goal_rows,
    print_header,
    print_not_measured,
    vs_switchboard_rows,
    warn_disturbed,
)
from bench.harness import (
    fmt as _f,
)
from bench.ws_targets import TARGETS

W = max(len(t) for t in TARGETS)

# Issue 5's goals for the relay (`switchboard`) and the websocket process.
GOAL_CPU_X_NGINX = 1.5  # relay CPU per round trip / nginx's, at most
GOAL_ADDED_VS = "aiohttp-relay"  # c1 p50 added over direct: at most this relay's
GOAL_IDLE_KB = 20.0  # KB of RSS per idle authenticated connection, under


def _measured(results: dict[str, Any]) -> dict[str, Any]:
    return {n: r for n, r in results.items() if "loaded" in r and "c1" in r}


def _c1(r: dict[str, Any], key: str) -> float | None:
    value: float | None = r["c1"]["lat_ms"].get(key)
    return value


def _ratio(a: float | None, b: float | None, n: int = 2) -> float | None:
    return None if a is None or not b else round(a / b, n)


def derive(results: dict[str, Any]) -> None:
    """Per target: CPU per round trip of each process, x nginx, added latency over
    direct, and ratios to Switchboard."""
    by = _measured(results)
    for r in by.values():
        L = r["loaded"]
        d: dict[str, Any] = {}
        n = L["messages"]
        if n and L.get("cpu_s"):
            # CPU microseconds per round trip (one message each way), per process
            d["cpu_us_per_msg"] = {k: round(v / n * 1e6, 1) for k, v in L["cpu_s"].items()}
            d["user_us_per_msg"] = {k: round(v / n * 1e6, 1) for k, v in L["cpu_user_s"].items()}
        r["derived"] = d
    ng, direct, sb = by.get("nginx"), by.get("direct"), by.get("switchboard")
    for r in by.values():
        d = r["derived"]
        relay = d.get("cpu_us_per_msg", {}).get("relay")
        if direct and _c1(r, "p50") is not None and _c1(direct, "p50") is not None:
            d["added_c1_p50_ms"] = round(_c1(r, "p50") - _c1(direct, "p50"), 3)  # type: ignore[operator]
        if ng:
            d["x_nginx"] = _ratio(r["loaded"]["msgs_per_s"], ng["loaded"]["msgs_per_s"], 3)
            d["c1_p50_x_nginx"] = _ratio(_c1(r, "p50"), _c1(ng, "p50"))
            d["relay_cpu_x_nginx"] = _ratio(
                relay, ng["derived"].get("cpu_us_per_msg", {}).get("relay")
            )
        if sb and r is not sb:
            # throughput: system / switchboard (above 1: faster than switchboard);
            # CPU and latency: switchboard / system (above 1: switchboard costs more).
            d["msgs_vs_switchboard"] = _ratio(r["loaded"]["msgs_per_s"], sb["loaded"]["msgs_per_s"])
            sb_relay = sb["derived"].get("cpu_us_per_msg", {}).get("relay")
            d["switchboard_cpu_vs"] = _ratio(sb_relay, relay)
            d["switchboard_c1_p50_vs"] = _ratio(_c1(sb, "p50"), _c1(r, "p50"))


def _busiest(runs: list[dict[str, Any]]) -> float:
    return max(
        (r[phase].get("other_busy_pct") or 0.0 for r in runs for phase in ("loaded", "c1")),
        default=0.0,
    )


def goals(results: dict[str, Any], memory: dict[str, Any]) -> dict[str, Any]:
    """Issue 5's three goals, each None when its systems were not measured."""
    by = _measured(results)
    g: dict[str, Any] = {}
    sb = by.get("switchboard")
    if sb:
        ratio = sb["derived"].get("relay_cpu_x_nginx")
        g["cpu_x_nginx"] = ratio
        g["cpu_x_nginx_met"] = None if ratio is None else ratio <= GOAL_CPU_X_NGINX
        g["relay_us_per_msg"] = sb["derived"].get("cpu_us_per_msg", {}).get("relay")
        if "nginx" in by:
            g["nginx_us_per_msg"] = by["nginx"]["derived"].get("cpu_us_per_msg", {}).get("relay")
        added = sb["derived"].get("added_c1_p50_ms")
        peer = by.get(GOAL_ADDED_VS, {}).get("derived", {}).get("added_c1_p50_ms")
        g["added_c1_p50_ms"] = added
        g["peer_added_c1_p50_ms"] = peer
        g["added_met"] = None if added is None or peer is None else added <= peer
        involved = [by[n] for n in ("switchboard", "nginx", "direct", GOAL_ADDED_VS) if n in by]
        g["disturbed"] = _busiest(involved) > OTHER_BUSY_WARN
    kb = (memory.get("switchboard") or {}).get("kb_per_conn")
    g["idle_kb_per_conn"] = kb
    g["idle_met"] = None if kb is None else kb < GOAL_IDLE_KB
    return g


def _x(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _errors(r: dict[str, Any]) -> int:
    return sum(r[k]["errors"] for k in ("warmup", "loaded", "c1") if k in r)


def print_report(doc: dict[str, Any]) -> None:
    p = doc["params"]
    c = p["connections"]
    results, skipped = doc["targets"], doc["not_measured"]
    print()
    print_header(
        f"{'target':<{W}} {'c1 p50':>7} {'c1 p99':>7} {'c1 +p50':>7} {'p50 x ngx':>9}"
        f" {f'msg/s c{c}':>10} {'x nginx':>7} {f'c{c} p50':>7} {f'c{c} p99':>7} {'errs':>5}"
    )
    for name in p["targets"]:
        if name in skipped:
            print(f"{name:<{W}} NOT MEASURED: {skipped[name]}")
            continue
        r = results.get(name, {})
        if "derived" not in r:
            print(f"{name:<{W}} ERROR {r.get('error')}")
            continue
        L, d = r["loaded"], r["derived"]
        print(
            f"{name:<{W}} {_f(_c1(r, 'p50')):>7} {_f(_c1(r, 'p99')):>7}"
            f" {_f(d.get('added_c1_p50_ms')):>7} {_f(d.get('c1_p50_x_nginx'), 2):>9}"
            f" {L['msgs_per_s']:>10.0f} {_f(d.get('x_nginx'), 2):>7}"
            f" {_f(L['lat_ms']['p50']):>7} {_f(L['lat_ms']['p99']):>7} {_errors(r):>5}"
        )
    pinned = ", all on one CPU" if p["c1_affinity"] == "one-cpu" else ""
    print(
        f"(ms; c1: 1 connection, strict ping-pong of a {p['msg_bytes']}-byte text, {p['lat_count']}"
        f" msgs or {p['lat_seconds']:g} s{pinned};\n msg/s: {c} connections ping-pong for"
        f" {p['duration_s']:g} s after a {p['warmup_s']:g} s warm-up; c1 +p50 = c1 p50 - direct's;"
        "\n x nginx / p50 x ngx = ratio to nginx; errs = failed or missing echoes and dropped"
        f"\n connections, all phases; client: {p['client']} + {p['loop']}, 1 process)"
    )
    _print_cpu(doc)
    _print_vs_switchboard(doc)
    _print_memory(doc)
    _print_goals(doc)
    print_not_measured(skipped)


def _print_cpu(doc: dict[str, Any]) -> None:
    """CPU per round trip: steadier than msg/s on a small, shared box."""
    c = doc["params"]["connections"]
    by = _measured(doc["targets"])
    rows = [
        n
        for n in doc["params"]["targets"]
        if by.get(n, {}).get("derived", {}).get("cpu_us_per_msg")
    ]
    if not rows:
        return
    print()
    print(f"CPU time per round trip in the c{c} run (µs, user+sys; nginx = master + worker):")
    print_header(
        f"{'target':<{W}} {'relay':>7} {'usr':>6} {'x nginx':>7} {'1-core msg/s':>12}"
        f" {'upstream':>8} {'client':>7} {'busy':>5} {'other%':>6}"
    )
    busiest = 0.0
    for name in rows:
        r = by[name]
        d, L = r["derived"], r["loaded"]
        cpu = d["cpu_us_per_msg"]
        relay = cpu.get("relay")
        ceiling = f"{1e6 / relay:.0f}" if relay else "-"
        other = max(L.get("other_busy_pct") or 0.0, r["c1"].get("other_busy_pct") or 0.0)
        busiest = max(busiest, other)
        print(
            f"{name:<{W}} {_f(relay, 1):>7} {_f(d['user_us_per_msg'].get('relay'), 1):>6}"
            f" {_f(d.get('relay_cpu_x_nginx'), 2):>7} {ceiling:>12} {_f(cpu.get('upstream'), 1):>8}"
            f" {_f(cpu.get('client'), 1):>7} {L['busy_pct']:>4.0f}% {other:>6.1f}"
        )
    print(
        "(usr = the user-space part of relay, the rest is kernel time (loopback TCP);"
        "\n 1-core msg/s = 1e6 / relay µs: round trips/s the relay could carry on one core;"
        f"\n busy = CPU of client + relay + upstream (+ switchboard's redis-server) / "
        f"({os.cpu_count()} CPUs x run time);\n other% = the rest of the box's busy time,"
        " the highest of the c32 and c1 runs)"
    )
    warn_disturbed(busiest, "run")


def _print_vs_switchboard(doc: dict[str, Any]) -> None:
    by = _measured(doc["targets"])
    if "switchboard" not in by or len(by) < 2:
        return
    c = doc["params"]["connections"]
    print()
    print("Each system against switchboard (same run): msg/s = system / switchboard (above 1:")
    print("faster); relay CPU and c1 p50 = switchboard / system (above 1: switchboard costs")
    print("more); c1 +p50 = the p50 each adds over direct at 1 connection, in ms:")
    print_header(
        f"{'system':<{W}} {f'msg/s c{c}':>10} {'relay CPU':>9} {'c1 p50':>7} {'c1 +p50':>8}"
    )
    for name, d in vs_switchboard_rows(doc["params"]["targets"], by):
        print(
            f"{name:<{W}} {_x(d.get('msgs_vs_switchboard')):>10}"
            f" {_x(d.get('switchboard_cpu_vs')):>9}"
            f" {_x(d.get('switchboard_c1_p50_vs')):>7} {_f(d.get('added_c1_p50_ms')):>8}"
        )
    sbd = by["switchboard"]["derived"]
    print(
        f"{'switchboard':<{W}} {'1.00x':>10} {'1.00x':>9} {'1.00x':>7}"
        f" {_f(sbd.get('added_c1_p50_ms')):>8}"
    )


MEMORY_LABELS = {
    "switchboard": "switchboard /ws (JWT at upgrade)",
    "sanic-relay": "sanic-relay /ws/idle (plain)",
}


def _print_memory(doc: dict[str, Any]) -> None:
    mem = doc["memory"]
    if not mem:
        return
    print()
    print("Idle connections held by one server process (RSS growth per connection):")
    width = max(len(v) for v in MEMORY_LABELS.values())
    print_header(
        f"{'server':<{width}} {'open':>11} {'open s':>6} {'fds held':>8}"
        f" {'RSS before':>10} {'held':>8} {'closed':>8} {'KB/conn':>7} {'x sanic':>7}"
    )
    sanic_kb = (mem.get("sanic-relay") or {}).get("kb_per_conn")
    for name, label in MEMORY_LABELS.items():
        m = mem.get(name)
        if m is None:
            continue
        if m.get("kb_per_conn") is None:
            print(f"{label:<{width}} ERROR {m.get('error') or m.get('first_error')}")
            continue
        opened = f"{m['opened']}/{m['requested']}"
        print(
            f"{label:<{width}} {opened:>11} {m['open_s']:>6.2f}"
            f" {m['server_fds_held']:>8} {m['rss_kb_before'] / 1024:>7.1f} MB"
            f" {m['rss_kb_held'] / 1024:>5.1f} MB {m['rss_kb_after_close'] / 1024:>5.1f} MB"
            f" {m['kb_per_conn']:>7.1f} {_f(_ratio(m['kb_per_conn'], sanic_kb), 2):>7}"
        )
        if m["open_errors"]:
            print(f"  {m['open_errors']} failed to open: {m['first_error']}")
    print(
        "(open = connections open / asked for, 50 opened and closed first; RSS = VmRSS before,"
        "\n with them held, and after closing them; KB/conn = (held - before) / open;"
        "\n switchboard: one JWT per connection, verified at the upgrade; x sanic = KB/conn over"
        "\n the plain Sanic endpoint's)"
    )


def _print_goals(doc: dict[str, Any]) -> None:
    g = doc["goals"]
    print()
    print("Issue 5's goals for the relay (/ws/proxy/...) and the websocket process:")
    rows: list[tuple[str, str, bool | None]] = []
    if "cpu_x_nginx" in g:
        rows.append(
            (
                f"relay CPU per round trip <= {GOAL_CPU_X_NGINX}x nginx's"
                f" ({_f(g['relay_us_per_msg'], 1)} against {_f(g.get('nginx_us_per_msg'), 1)} µs)",
                f"{_f(g['cpu_x_nginx'], 2)}x",
                g["cpu_x_nginx_met"],
            )
        )
        rows.append(
            (
                f"added p50 at c1 <= {GOAL_ADDED_VS}'s ({_f(g['peer_added_c1_p50_ms'])} ms)",
                f"{_f(g['added_c1_p50_ms'])} ms",
                g["added_met"],
            )
        )
    rows.append(
        (
            f"RSS per idle authenticated connection < {GOAL_IDLE_KB:g} KB",
            f"{_f(g['idle_kb_per_conn'], 1)} KB",
            g["idle_met"],
        )
    )
    print_goal_rows(rows, g.get("disturbed"))
