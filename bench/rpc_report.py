"""What `bench.rpc` derives and prints: ratios to Switchboard, issue 3's goal, the tables."""

from __future__ import annotations

from typing import Any

from bench.harness import print_header, print_not_measured, warn_disturbed
from bench.rpc_systems import SYSTEMS

W = max(len(s) for s in SYSTEMS)  # width of the name column


def ratios(results: dict[str, Any], conc: int) -> dict[str, float]:
    """Each peer against Switchboard: throughput as peer/switchboard (above 1 =
    the peer is faster), latency at 1 caller as switchboard/peer (above 1 =
    Switchboard is slower)."""
    sb = results.get("switchboard")
    if not sb or "error" in sb:
        return {}
    out: dict[str, float] = {}
    for peer, r in results.items():
        if peer == "switchboard" or "error" in r:
            continue
        for key in ("c1", f"c{conc}"):
            if sb[key]["calls_per_s"]:
                out[f"{peer}/switchboard throughput {key}"] = round(
                    r[key]["calls_per_s"] / sb[key]["calls_per_s"], 2
                )
        for q in ("p50", "p99"):
            if r["c1"]["lat_ms"][q] and sb["c1"]["lat_ms"][q]:
                out[f"switchboard/{peer} latency {q} c1"] = round(
                    sb["c1"]["lat_ms"][q] / r["c1"]["lat_ms"][q], 2
                )
    return out


# Issue 3's goal, with redelivery and deduplication on (Switchboard's defaults):
# at c64 at least the floor's throughput, at c1 a p50 within 1.2x of the floor's.
GOAL_C64_THROUGHPUT = 1.0  # switchboard / floor, at least
GOAL_C1_P50 = 1.2  # switchboard / floor, at most


def goal(ratio: dict[str, float], conc: int) -> dict[str, Any]:
    thr = ratio.get(f"floor/switchboard throughput c{conc}")
    p50 = ratio.get("switchboard/floor latency p50 c1")
    if thr is None or p50 is None or not thr:
        return {}
    sb_over_floor = round(1 / thr, 2)
    return {
        "disturbed": False,  # set by main() from the other % of these two systems
        f"switchboard/floor throughput c{conc}": sb_over_floor,
        f"c{conc} throughput met": sb_over_floor >= GOAL_C64_THROUGHPUT,
        "switchboard/floor latency p50 c1": p50,
        "c1 p50 met": p50 <= GOAL_C1_P50,
    }


def spread(m: dict[str, Any]) -> str:
    runs = m.get("calls_per_s_runs") or []
    if len(runs) < 2 or not m["calls_per_s"]:
        return "-"
    return f"{(max(runs) - min(runs)) / 2 / m['calls_per_s'] * 100:.0f}"


def print_report(doc: dict[str, Any]) -> None:
    conc = doc["params"]["concurrency"]
    results = doc["systems"]
    skipped = doc["not_measured"]
    cN = f"c{conc}"
    hdr = (
        f"{'system':<{W}} {'c1 calls/s':>11} {'±%':>4} {'p50 ms':>7} {'p99 ms':>7}"
        f" {cN + ' calls/s':>12} {'±%':>4} {'p50 ms':>7} {'p99 ms':>7} {'err':>4}"
    )
    print()
    print_header(hdr)
    for name in doc["params"]["systems"]:
        if name in skipped:
            print(f"{name:<{W}} NOT MEASURED (see the end of the output)")
            continue
        r = results[name]
        if "error" in r:
            print(f"{name:<{W}} ERROR {r['error']}")
            continue
        a, b = r["c1"], r[cN]

        def cap(m: dict[str, Any]) -> str:
            return "*" if m["hit_time_cap"] else ""

        print(
            f"{name:<{W}} {a['calls_per_s']:>10}{cap(a):1} {spread(a):>4} {a['lat_ms']['p50']:>7}"
            f" {a['lat_ms']['p99']:>7} {b['calls_per_s']:>11}{cap(b):1} {spread(b):>4}"
            f" {b['lat_ms']['p50']:>7} {b['lat_ms']['p99']:>7} {a['errors'] + b['errors']:>4}"
        )
    print(
        "(calls/s = median of the repeats; ±% = (max-min)/2/median; latencies pooled over the\n"
        " repeats; * = a run was stopped by --max-seconds before --count)"
    )
    print()
    hdr2 = (
        f"{'system':<{W}} {'phase':>5} {'client µs':>10} {'worker µs':>10} {'redis µs':>9}"
        f" {'total µs':>9} {'redis cmds':>10} {'other %':>8}"
    )
    print("CPU time (user+sys) and Redis commands per call; other % = the rest of the box:")
    busiest = 0.0
    print_header(hdr2)
    for name, r in results.items():
        if "error" in r:
            continue
        for key in ("c1", cN):
            c = r[key]["cpu_per_call"]
            print(
                f"{name:<{W}} {key:>5} {c['client_us']:>10} {c['worker_us']:>10}"
                f" {c['redis_us']:>9} {c['total_us']:>9} {c['redis_cmds']:>10}"
                f" {'-' if c['other_busy_pct'] is None else c['other_busy_pct']:>8}"
            )
            busiest = max(busiest, c["other_busy_pct"] or 0.0)
    warn_disturbed(busiest, "phase")
    ratio = doc["ratios"]
    peers = [n for n in results if n != "switchboard" and f"{n}/switchboard throughput c1" in ratio]
    if peers:
        print()
        print("Each peer against switchboard (same run): throughput = peer / switchboard")
        print("(above 1: the peer is faster); latency = switchboard / peer (above 1: switchboard")
        print("is slower):")
        hdr3 = f"{'peer':<{W}} {'c1 calls/s':>11} {cN + ' calls/s':>12} {'c1 p50':>7} {'c1 p99':>7}"
        print_header(hdr3)

        def x(key: str) -> str:
            return f"{ratio[key]:.2f}x" if key in ratio else "-"

        for n in peers:
            print(
                f"{n:<{W}} {x(f'{n}/switchboard throughput c1'):>11}"
                f" {x(f'{n}/switchboard throughput {cN}'):>12}"
                f" {x(f'switchboard/{n} latency p50 c1'):>7}"
                f" {x(f'switchboard/{n} latency p99 c1'):>7}"
            )
    g = doc["goal"]
    if g:
        print()
        thr_met = "met" if g[f"{cN} throughput met"] else "NOT met"
        p50_met = "met" if g["c1 p50 met"] else "NOT met"
        print(
            "Issue 3's goal (redelivery and deduplication on): "
            f"switchboard/floor {cN} throughput {g[f'switchboard/floor throughput {cN}']:.2f}x"
            f" (goal >= {GOAL_C64_THROUGHPUT}x: {thr_met}),"
            f" c1 p50 {g['switchboard/floor latency p50 c1']:.2f}x"
            f" (goal <= {GOAL_C1_P50}x: {p50_met})"
        )
        if g["disturbed"]:
            print("  (not conclusive: the box was busy while switchboard or the floor ran)")
    print_not_measured(skipped)


def busiest_other(doc: dict[str, Any], systems: tuple[str, ...]) -> float:
    """The highest `other %` over the phases of `systems` (0 when not measured)."""
    out = 0.0
    for name in systems:
        r = doc["systems"].get(name) or {}
        for key, m in r.items():
            if key.startswith("c") and isinstance(m, dict) and "cpu_per_call" in m:
                out = max(out, m["cpu_per_call"]["other_busy_pct"] or 0.0)
    return out
