#!/usr/bin/env python3
"""Combines bench/run.sh's sections into one report: a table on stdout, DIR/bench.json,
DIR/bench.md (the Markdown table) and DIR/bench.svg (the ratios as bars, each with a marker at its
bar). With --update-readme it also copies the JSON and SVG to docs/bench/latest.* and puts the
Markdown table into README.md between the bench markers.

Every section is {"section": NAME, "rows": [ROW...]} (or {"section": NAME, "missing": WHY}), a row:
  {"case": "4k randread qd32", "unit": "IOPS",
   "ours": {"name": ..., "value": N, "p50_us": N, "p99_us": N},
   "peers": [{"name": ..., "value": N, "p50_us": N, "p99_us": N, "ratio": N}],
   "bar": {"peer name": 1.0},                     # ratio ours/peer must reach this
   "limit": {"what": "B/IO", "value": N, "max": 0}}  # optional absolute bar
Sections are read from DIR: binding.json, nbd.json and any other *.json already in that shape;
micro/results/*-report-full.json (BenchmarkDotNet) and vm-fio.json (bench/vm-fio.sh) are
converted here.

usage: bench/report.py DIR [--update-readme] [--wall SECONDS] | --self-test
"""
import datetime
import glob
import html
import json
import os
import platform
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORDER = ["vm", "binding", "micro", "memory", "nbd", "nbd-tls", "rbd"]
MARK_BEGIN, MARK_END = "<!-- bench:begin -->", "<!-- bench:end -->"


def vm_sections(path):
    """bench/vm-fio.sh's JSON as the fio section and the memory section."""
    j = json.load(open(path))
    # Bars from the issue; peers without one are shown for information.
    bars = {"null 4k randread qd1": {"kloop": 1.0}, "null 4k randread qd64": {"kloop": 0.9},
            "loop 4k randread qd64": {"kloop": 0.9}, "loop 4k randwrite qd64": {"kloop": 0.9},
            "loop 128k read qd16": {"kloop": 0.7}, "loop 128k write qd16": {"kloop": 0.7},
            "cow 4k randread qd64": {"ublk-loop-fs": 0.8}, "cow 4k randwrite qd64": {"ublk-loop-fs": 0.8}}
    names = {"kloop": "kernel loop", "file": "fio on the file", "ublksrv-null": "ublksrv null",
             "ublksrv-loop": "ublksrv loop", "ublk-null": "UblkSharp null", "ublk-loop": "UblkSharp loop",
             "ublk-mem": "UblkSharp mem", "ublk-cow": "UblkSharp cow", "ublk-loop-fs": "UblkSharp loop, same file"}
    rows = []
    for c in j["cases"]:
        key = c["metric"]
        ours_dev = next(iter(c["devices"]))  # vm-fio.sh lists ours first

        def fig(dev):
            m = c["devices"][dev]["median"]
            return {"name": names.get(dev, dev), "value": m.get(key), "p50_us": m.get("p50_us"), "p99_us": m.get("p99_us"),
                    "cpu_us_per_io": m.get("cpu_us_per_io"), "server_cpu_us_per_io": m.get("cpu0_us_per_io"),
                    "daemon_cpu_pct": m.get("daemon_cpu_pct")}
        peers = []
        for dev, r in c["ratios"].items():
            p = fig(dev)
            p["ratio"], p["ratio_runs"], p["p50_ratio"] = r["throughput"], r["throughput_runs"], r["p50"]
            peers.append(p)
        rows.append({"case": c["case"], "unit": "MiB/s" if key == "mibs" else "IOPS", "ours": fig(ours_dev), "peers": peers,
                     "bar": {names.get(k, k): v for k, v in bars.get(c["case"], {}).items()}})
    g = j.get("guest", {})
    vm = {"section": "vm", "rows": rows,
          "note": f"one boot of tools/ublksharp-vm (qemu TCG, kernel {g.get('kernel', '?')}, {g.get('cpus', '?')} vCPUs); "
                  f"fio {j['engine']} direct=1, medians of {j['reps']} interleaved repetitions of {j['runtime_s']} s; "
                  "servers pinned to CPU 0, fio to CPU 1, scheduler none",
          "host": j.get("host"), "stretch": j.get("stretch"), "wall_s": j.get("wall_s"),
          "threads_cpu_s": j.get("threads_cpu_s", {})}
    # The profile that explains a shortfall: where each daemon's CPU went, by thread.
    prof = ["{} ({})".format(names.get(d, d), ", ".join(f"{n} {v:.0f} s" for n, v in sorted(t.items(), key=lambda kv: -kv[1]) if v >= 0.5))
            for d, t in sorted(j.get("threads_cpu_s", {}).items())]
    if prof:
        vm["note"] += "; daemon CPU by thread over warm-up and runs (iou-wrk: io_uring's io-wq workers; dotnet: the main thread): " + "; ".join(prof)
    mem_rows = []
    for dev, r in sorted(j.get("rss_kib", {}).items()):
        if dev.startswith("ublksrv") or r.get("idle") is None:
            continue
        peer_dev = {"ublk-null": "ublksrv-null", "ublk-loop": "ublksrv-loop"}.get(dev)
        peer = j["rss_kib"].get(peer_dev) if peer_dev else None
        for what, val, pval in (("idle", r["idle"], peer and peer.get("idle")),
                                ("under fio load (peak)", r.get("load_max"), peer and peer.get("load_max"))):
            if val is None:
                continue
            row = {"case": f"RSS {names.get(dev, dev)} {what}", "unit": "MiB", "lower_is_better": True,
                   "ours": {"name": names.get(dev, dev), "value": val / 1024}, "peers": [], "bar": {}}
            if pval:
                row["peers"].append({"name": names[peer_dev], "value": pval / 1024, "ratio": val / pval})
            mem_rows.append(row)
    memory = {"section": "memory", "rows": mem_rows,
              "note": "each device is its own daemon (1 queue, depth 128); VmRSS right after `add` and at the end of each fio run"
                      " (mem holds its 256 MiB of data)"}
    return [vm, memory]


def micro_section(path):
    j = json.load(open(path))
    rows = []
    for b in j["Benchmarks"]:
        alloc = b["Memory"]["BytesAllocatedPerOperation"]
        rows.append({"case": f"hot path: {b['Method']}", "unit": "ns/IO",
                     "ours": {"name": "UblkSharp", "value": b["Statistics"]["Median"]}, "peers": [], "bar": {},
                     "limit": {"what": "B/IO", "value": alloc, "max": 0}})
    return {"section": "micro", "rows": rows,
            "note": f"BenchmarkDotNet {j['HostEnvironmentInfo'].get('BenchmarkDotNetVersion', '')} in-process, median ns per IO "
                    "(batches of 32) and managed bytes allocated per IO; the host's io_uring, ublk commands aimed at /dev/null"}


def load(d):
    sections, missing = {}, {}
    for path in sorted(glob.glob(os.path.join(d, "*.json"))):
        name = os.path.basename(path)[:-5]
        if name in ("bench", "vm-fio", "timings"):
            continue
        try:
            s = json.load(open(path))
        except ValueError as e:
            missing[name] = f"{path} is not JSON: {e}"
            continue
        if isinstance(s, dict) and "section" in s:
            sections[s["section"]] = s
    if os.path.exists(os.path.join(d, "vm-fio.json")):
        for s in vm_sections(os.path.join(d, "vm-fio.json")):
            sections[s["section"]] = s
    micro = glob.glob(os.path.join(d, "micro", "results", "*-report-full.json"))
    if micro:
        sections["micro"] = micro_section(micro[0])
    # Why a section is missing, as run.sh noted it.
    if os.path.exists(os.path.join(d, "missing.txt")):
        for line in open(os.path.join(d, "missing.txt")):
            if ":" in line:
                k, v = line.split(":", 1)
                missing.setdefault(k.strip(), v.strip())
    for name, s in list(sections.items()):
        if "missing" in s:
            missing.setdefault(name, s["missing"])
            del sections[name]
    for name in ORDER:
        if name not in sections:
            missing.setdefault(name, "not run")
    return sections, missing


def num(x, unit=""):
    if x is None:
        return "-"
    if unit in ("IOPS", "ops/s", "ops/CPU-s"):
        return f"{x:,.0f}"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}"


def cell(f, unit):
    s = f"{num(f.get('value'), unit)} {unit}"
    if f.get("p50_us") is not None:
        s += f" (p50 {num(f['p50_us'])} µs, p99 {num(f.get('p99_us'))} µs)"
    return s


def lines(sections):
    """Flattened table lines: (section, case, ours, peer, ratio, bar, result)."""
    out = []
    for name in sorted(sections, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER)):
        for r in sections[name]["rows"]:
            ours = cell(r["ours"], r["unit"])
            lim = r.get("limit")
            if lim:
                ok = lim["value"] is not None and lim["value"] <= lim["max"]
                out.append((name, r["case"], f"{ours}, {lim['value']:g} {lim['what']}", "-", "-",
                            f"≤ {lim['max']} {lim['what']}", "pass" if ok else "SHORT"))
            for p in r["peers"]:
                bar = r.get("bar", {}).get(p["name"])
                ratio = p.get("ratio")
                res = "" if bar is None else ("pass" if ratio is not None and ratio >= bar else "SHORT")
                label = f"{num(ratio)}×" if ratio is not None else "-"
                if r.get("lower_is_better"):
                    label += " (lower is better)"
                out.append((name, r["case"], ours, f"{p['name']}: {cell(p, r['unit'])}", label,
                            f"≥ {bar}×" if bar is not None else "", res))
            if not r["peers"] and not lim:
                out.append((name, r["case"], ours, "-", "-", "", ""))
    return out


def markdown(report):
    rows = ["| section | case | ours | peer | ratio | bar | result |", "|---|---|---|---|---|---|---|"]
    for ln in lines(report["sections"]):
        ln = list(ln)
        if ln[6] == "SHORT":
            ln[6] = "**short**"
        rows.append("| " + " | ".join(x.replace("|", "/") for x in ln) + " |")
    for name, why in report["missing"].items():
        rows.append(f"| {name} | (missing) | {why} | | | | |")
    rows.append("")
    rows.append("- ratio: ours / peer within each repetition, median over the repetitions (so it need not equal the "
                "ratio of the medians shown); bars as in the issue, rows without one are for information")
    for name in sorted(report["sections"], key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER)):
        if report["sections"][name].get("note"):
            rows.append(f"- {name}: {report['sections'][name]['note']}")
    return "\n".join(rows) + "\n"


def svg(report):
    """Horizontal bars of every ratio with a bar to meet or for information; a dashed line at 1.0."""
    items = []
    for name in sorted(report["sections"], key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER)):
        for r in report["sections"][name]["rows"]:
            if r.get("lower_is_better"):
                continue
            for p in r["peers"]:
                if p.get("ratio") is not None:
                    items.append((f"{r['case']} vs {p['name']}", p["ratio"], r.get("bar", {}).get(p["name"])))
    # Labels are right-aligned before the bars: size their column to the longest (about 7 px a character at 12 px).
    label_w, bar_w, row_h, top = max([200] + [16 + 7 * len(label) for label, _, _ in items]), 420, 22, 56
    scale_max = max([1.5] + [v * 1.1 for _, v, _ in items] + [b * 1.1 for _, _, b in items if b])
    x = lambda v: label_w + v / scale_max * bar_w
    h = top + row_h * len(items) + 40
    w = label_w + bar_w + 90
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
         f'<rect width="{w}" height="{h}" fill="white"/>',
         f'<text x="10" y="20" font-size="15" font-weight="bold">UblkSharp / peer, same run (higher is better)</text>',
         f'<text x="10" y="38" fill="#555">{html.escape(report["date"])} · {html.escape(report["machine"])}</text>']
    for i, (label, v, bar) in enumerate(items):
        y = top + i * row_h
        color = "#7a9cc6" if bar is None else ("#4caf50" if v >= bar else "#e57373")
        o.append(f'<text x="{label_w - 8}" y="{y + 14}" text-anchor="end">{html.escape(label)}</text>')
        o.append(f'<rect x="{label_w}" y="{y + 3}" width="{max(x(v) - label_w, 1):.1f}" height="{row_h - 6}" fill="{color}"/>')
        o.append(f'<text x="{x(v) + 4:.1f}" y="{y + 14}">{v:.2f}×</text>')
        if bar is not None:
            o.append(f'<line x1="{x(bar):.1f}" y1="{y}" x2="{x(bar):.1f}" y2="{y + row_h}" stroke="black" stroke-width="2">'
                     f'<title>bar {bar}×</title></line>')
    y_end = top + row_h * len(items)
    o.append(f'<line x1="{x(1):.1f}" y1="{top - 4}" x2="{x(1):.1f}" y2="{y_end + 4}" stroke="#333" stroke-dasharray="4 3"/>')
    o.append(f'<text x="{x(1):.1f}" y="{y_end + 18}" text-anchor="middle">1.0×</text>')
    o.append(f'<text x="10" y="{y_end + 32}" fill="#555">bars: green meets its bar (black tick), red falls short, blue has no bar</text>')
    o.append("</svg>")
    return "\n".join(o) + "\n"


def machine():
    try:
        debian = open("/etc/debian_version").read().strip()
    except OSError:
        debian = "?"
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.machine())
    return f"host: {os.cpu_count()} vCPU Debian {debian} ({cpu}); ublk rows in a qemu TCG guest"


def self_test():
    """Runs the report on made-up sections (no benchmark) and checks what it writes: test.sh runs this."""
    import tempfile
    import xml.etree.ElementTree as ET
    d = tempfile.mkdtemp(prefix="bench-report-test.")
    med = lambda v, p50=10.0: {"median": {"iops": v, "mibs": v / 256, "p50_us": p50, "p99_us": p50 * 3, "cpu_us_per_io": 5.0,
                                          "cpu0_us_per_io": 3.0, "daemon_cpu_pct": 50.0}}
    ratio = lambda r: {"throughput": r, "p50": 1 / r, "throughput_runs": [r, r, r], "p50_runs": [1 / r] * 3}
    vm = {"engine": "io_uring", "reps": 3, "runtime_s": 5, "guest": {"kernel": "6.12", "cpus": "2"},
          "cases": [{"case": "null 4k randread qd1", "metric": "iops", "devices": {"ublk-null": med(1100), "kloop": med(1000), "file": med(2000)},
                     "ratios": {"kloop": ratio(1.1), "file": ratio(0.55)}},
                    {"case": "loop 128k read qd16", "metric": "mibs", "devices": {"ublk-loop": med(600), "kloop": med(1000)},
                     "ratios": {"kloop": ratio(0.6)}},
                    {"case": "cow 4k randwrite qd64", "metric": "iops", "devices": {"ublk-cow": med(850), "ublk-loop-fs": med(1000)},
                     "ratios": {"ublk-loop-fs": ratio(0.85)}}],
          "rss_kib": {"ublk-null": {"idle": 40960, "load_max": 51200}}}
    json.dump(vm, open(os.path.join(d, "vm-fio.json"), "w"))
    os.makedirs(os.path.join(d, "micro", "results"))
    json.dump({"HostEnvironmentInfo": {"BenchmarkDotNetVersion": "0.14.0"},
               "Benchmarks": [{"Method": "RingNop", "Statistics": {"Median": 150.0}, "Memory": {"BytesAllocatedPerOperation": 0}},
                              {"Method": "Leaky", "Statistics": {"Median": 90.0}, "Memory": {"BytesAllocatedPerOperation": 24}}]},
              open(os.path.join(d, "micro", "results", "X-report-full.json"), "w"))
    json.dump({"section": "nbd", "rows": [{"case": "4k randread qd32", "unit": "IOPS", "ours": {"name": "ours-mem", "value": 900, "p50_us": 30, "p99_us": 90},
                                           "peers": [{"name": "nbdkit", "value": 1000, "p50_us": 28, "p99_us": 80, "ratio": 0.9}],
                                           "bar": {"nbdkit": 1.0}}]}, open(os.path.join(d, "nbd.json"), "w"))
    open(os.path.join(d, "missing.txt"), "w").write("binding: failed (exit 1), see binding.log\n")
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main([d, "--wall", "600"]) == 0
    table = buf.getvalue()
    want = [("null 4k randread qd1", "kernel loop", "1.10×", "pass"), ("null 4k randread qd1", "fio on the file", "0.55×", None),
            ("loop 128k read qd16", "kernel loop", "0.60×", "SHORT"), ("cow 4k randwrite qd64", "UblkSharp loop, same file", "0.85×", "pass"),
            ("hot path: RingNop", None, None, "pass"),
            ("hot path: Leaky", None, None, "SHORT"), ("4k randread qd32", "nbdkit", "0.90×", "SHORT")]
    for case, peer, r, res in want:
        hit = [l for l in table.splitlines() if case in l and (peer is None or peer in l)]
        assert hit, f"no table line for {case} / {peer}:\n{table}"
        assert r is None or r in hit[0], f"{case}: want {r} in {hit[0]}"
        assert (res or "pass") in hit[0] if res else ("pass" not in hit[0] and "SHORT" not in hit[0]), f"{case}: want {res}: {hit[0]}"
    assert "binding: missing (failed (exit 1)" in table, table
    assert "RSS UblkSharp null idle" in table and "40.0 MiB" in table, table
    tree = ET.parse(os.path.join(d, "bench.svg")).getroot()
    ns = "{http://www.w3.org/2000/svg}"
    bars = [r for r in tree.iter(ns + "rect")][1:]  # the first is the background
    ticks = [l for l in tree.iter(ns + "line") if l.find(ns + "title") is not None]
    assert len(bars) == 5 and len(ticks) == 4, f"{len(bars)} bars, {len(ticks)} bar markers"
    fills = sorted(b.get("fill") for b in bars)
    assert fills == sorted(["#4caf50", "#4caf50", "#7a9cc6", "#e57373", "#e57373"]), fills
    rep = json.load(open(os.path.join(d, "bench.json")))
    assert set(rep["sections"]) == {"vm", "memory", "micro", "nbd"} and "binding" in rep["missing"], rep.keys()
    md = open(os.path.join(d, "bench.md")).read()
    assert "| vm | loop 128k read qd16 |" in md and "| vm | cow 4k randwrite qd64 |" in md, md
    import shutil
    shutil.rmtree(d)
    print("bench/report.py --self-test: ok")
    return 0


def main(argv):
    if argv == ["--self-test"]:
        return self_test()
    if not argv or argv[0].startswith("-"):
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    d, update = argv[0], "--update-readme" in argv
    wall = int(argv[argv.index("--wall") + 1]) if "--wall" in argv else None
    sections, missing = load(d)
    timings = json.load(open(os.path.join(d, "timings.json"))) if os.path.exists(os.path.join(d, "timings.json")) else {}
    # The run's date: when its last section finished (so regenerating the report does not move it).
    inputs = [p for p in glob.glob(os.path.join(d, "*.json")) + glob.glob(os.path.join(d, "micro", "results", "*.json"))
              if os.path.basename(p) != "bench.json"]
    when = max((os.path.getmtime(p) for p in inputs), default=None)
    when = datetime.datetime.fromtimestamp(when, datetime.timezone.utc) if when else datetime.datetime.now(datetime.timezone.utc)
    report = {"date": when.strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
              "wall_s": wall, "section_wall_s": timings, "sections": sections, "missing": missing}
    json.dump(report, open(os.path.join(d, "bench.json"), "w"), indent=1)
    md = markdown(report)
    open(os.path.join(d, "bench.md"), "w").write(md)
    open(os.path.join(d, "bench.svg"), "w").write(svg(report))

    tl = lines(sections)
    widths = [max([len(h)] + [len(str(ln[i])) for ln in tl]) for i, h in enumerate(("section", "case", "ours", "peer", "ratio", "bar", "result"))]
    fmt = lambda ln: "  ".join(str(v).ljust(widths[i]) for i, v in enumerate(ln)).rstrip()
    print(fmt(("section", "case", "ours", "peer", "ratio", "bar", "result")))
    for ln in tl:
        print(fmt(ln))
    for name, why in missing.items():
        print(f"{name}: missing ({why})")
    for name, s in sections.items():
        if s.get("note"):
            print(f"{name}: {s['note']}")
    short = sum(1 for ln in tl if ln[6] == "SHORT")
    passed = sum(1 for ln in tl if ln[6] == "pass")
    print(f"\nbars: {passed} met, {short} short; {report['machine']}; {report['date']}"
          + (f"; run took {wall // 60} min {wall % 60} s" if wall else ""))
    print(f"written: {d}/bench.json, {d}/bench.md, {d}/bench.svg")

    if update:
        docs = os.path.join(ROOT, "docs", "bench")
        os.makedirs(docs, exist_ok=True)
        json.dump(report, open(os.path.join(docs, "latest.json"), "w"), indent=1)
        open(os.path.join(docs, "latest.svg"), "w").write(svg(report))
        readme = os.path.join(ROOT, "README.md")
        text = open(readme).read()
        if MARK_BEGIN not in text or MARK_END not in text:
            print(f"README.md has no {MARK_BEGIN} ... {MARK_END} block to update", file=sys.stderr)
            return 1
        took = f", `bench/run.sh` took {wall // 60} min {wall % 60} s" if wall else ""
        block = (f"{MARK_BEGIN}\nLatest run: {report['date']}, {report['machine']}{took}. "
                 f"Chart: [docs/bench/latest.svg](docs/bench/latest.svg), figures: [docs/bench/latest.json](docs/bench/latest.json).\n\n"
                 f"{md}\n![ratios](docs/bench/latest.svg)\n{MARK_END}")
        text = re.sub(re.escape(MARK_BEGIN) + ".*?" + re.escape(MARK_END), lambda _: block, text, flags=re.S)
        open(readme, "w").write(text)
        print("updated: README.md (Performance), docs/bench/latest.svg, docs/bench/latest.json")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
