"""bench.run's results.png and Markdown tables, and the count of failed requests that makes a run fail."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench import hol
from bench.cold_start import cold_start_table
from bench.forward import GOAL_GAP_MS, GOAL_RATIO
from bench.images import images_table
from bench.load import fmt
from bench.vllm_peer import rss_table
from bench.zero_cost import ZERO_COST_LABELS


def plot(result: dict[str, Any], path: Path) -> bool:
    """results.png: the sweep's row (throughput, latency, FLOP/s) and a row for the other parts; False if empty."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = bool(result.get("systems"))
    extra = any(key in result and "skipped" not in result[key] for key in ("zero_cost", "hol", "forward"))
    peers = bool(peer_bars(result))
    rows = int(sweep) + int(extra) + int(peers)
    if not rows:
        return False
    fig, axes = plt.subplots(rows, 3, figsize=(16, 4.8 * rows), squeeze=False)
    if sweep:
        plot_sweep(result, axes[0])
    if extra:
        plot_parts(result, axes[int(sweep)])
    if peers:
        plot_peers(result, axes[rows - 1])
    m = result["machine"]
    fig.suptitle(f"all-MiniLM-L6-v2 on {m.get('gpu') or m['cpu']} ({m['cpus']} CPUs), {result['created']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_sweep(result: dict[str, Any], axes: Any) -> None:
    ax_t, ax_l, ax_f = axes
    systems = result["systems"]
    cs = result["load"]["concurrency"]
    colors = {"engine": "tab:gray", "service": "tab:blue", "infinity_server": "tab:orange",
              "service_onnx-fp32": "tab:brown", "service_onnx-int8": "tab:red", "vllm": "tab:olive"}
    for name, by_c in systems.items():
        ax_t.plot(cs, [by_c[str(c)]["texts_per_s"] for c in cs], "o-", label=name, color=colors.get(name))
        ax_l.plot(cs, [by_c[str(c)]["p50_ms"] for c in cs], "o-", label=f"{name} p50", color=colors.get(name))
        ax_l.plot(cs, [by_c[str(c)]["p99_ms"] for c in cs], "x--", label=f"{name} p99", color=colors.get(name))
    st = result["st_baseline"]["sentences"]["texts_per_s"]["median"]
    ax_t.axhline(st, color="tab:green", linestyle=":", label="sentence-transformers encode(batch 32)")
    ax_t.set(xscale="log", xlabel="concurrent one-sentence requests", ylabel="texts/s (median of rounds)",
             title="Throughput", xticks=cs, xticklabels=[str(c) for c in cs], ylim=(0, None))
    ax_l.set(xscale="log", yscale="log", xlabel="concurrent one-sentence requests", ylabel="latency, ms",
             title="Latency", xticks=cs, xticklabels=[str(c) for c in cs])
    limit = result["limit"]
    bars = {k: v["fraction"] for k, v in limit.items() if isinstance(v, dict)}
    ax_f.barh(list(bars), [100 * v for v in bars.values()], color="tab:purple")
    ax_f.set(xlabel=f"% of measured {limit['matmul_dtype']} matmul ({limit['matmul_gflops']:.0f} GFLOP/s)",
             title="Useful FLOP/s against the device's matmul")
    for ax in (ax_t, ax_l):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)


def peer_bars(result: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The bars of the peers' row: mixed-length texts/s, seconds to the first answer, RSS after the soak."""
    bars: dict[str, dict[str, float]] = {}
    mixed = result.get("mixed", {})
    low = mixed.get("connections")
    for name, values in mixed.get("texts_per_s", {}).items():
        if name != "reference" and values.get("mixed", {}).get("median") is not None:
            bars.setdefault(f"mixed lengths, {low} connections: texts/s", {})[name] = values["mixed"]["median"]
    cold = result.get("cold_start", {})
    for name, label in (("service", "service"), ("runpod", "RunPod worker"), ("vllm", "vllm")):
        if name in cold:
            bars.setdefault("cold start to the first answer: s", {})[label] = cold[name]["first_answer_s"]["median"]
    if "vllm" in cold:
        bars["cold start to the first answer: s"]["vllm, empty compile cache"] = cold["vllm"]["first_start_s"]
    for name, row in result.get("peer_rss", {}).get("systems", {}).items():
        if row.get("rss_end_mb") is not None:
            bars.setdefault("RSS at the end of the soak: MB", {})[name] = row["rss_end_mb"]
    return bars


def plot_peers(result: dict[str, Any], axes: Any) -> None:
    colors = {"service": "tab:blue", "infinity_server": "tab:orange", "service_onnx_int8": "tab:red",
              "service_ct2": "tab:brown", "vllm": "tab:olive", "vllm, empty compile cache": "tab:olive"}
    panels = list(peer_bars(result).items())
    for ax, (title, values) in zip(axes, panels):
        names = list(values)
        ax.barh(names, list(values.values()), color=[colors.get(n, "tab:gray") for n in names])
        for i, v in enumerate(values.values()):
            ax.text(v, i, f" {v:.1f}", va="center", fontsize=7)
        ax.invert_yaxis()
        ax.set(title=title)
        ax.grid(True, axis="x", alpha=0.3)
    for ax in axes[len(panels):]:
        ax.axis("off")


def plot_parts(result: dict[str, Any], axes: Any) -> None:
    ax_z, ax_h, ax_r = axes
    zc = result.get("zero_cost", {})
    if zc.get("systems"):
        high, low = zc["connections"]
        names = list(zc["systems"])
        rps = [zc["systems"][n].get(str(high), {}).get("requests_per_s", 0) for n in names]
        ax_z.barh(names, rps, color="tab:blue")
        for i, n in enumerate(names):
            p50 = zc["systems"][n].get(str(low), {}).get("p50_ms")
            if p50 is not None:
                ax_z.text(rps[i], i, f" p50@{low} {p50:.2f} ms", va="center", fontsize=7)
        ax_z.invert_yaxis()
        client = "wrk" if zc.get("load_client", "").startswith("wrk") else "httpx"
        ax_z.set(xlabel=f"req/s at {high} connections ({client}; bar labels: p50 at {low})",
                 title="Zero-cost model (1 layer, 32 wide): server overhead")
        ax_z.grid(True, axis="x", alpha=0.3)
    else:
        ax_z.axis("off")
    hol_targets = result.get("hol", {}).get("targets", {})
    if hol_targets:
        names = list(hol_targets)
        keys = (("idle_p50_ms", "idle p50"), ("query_p50_ms", "p50 during bulk"), ("query_worst_ms", "worst during bulk"))
        width = 0.8 / len(keys)
        for j, (key, label) in enumerate(keys):
            ax_h.bar([i + j * width for i in range(len(names))], [hol_targets[n].get(key) or 0 for n in names],
                     width, label=label)
        ax_h.axhline(hol.GOAL_WORST_MS, color="tab:red", linestyle=":", label="goal: worst")
        ax_h.set_xticks([i + width for i in range(len(names))],
                        [f"{n}\nbulk {100 * (hol_targets[n].get('bulk_slowdown') or 0):+.0f} % with queries" for n in names])
        bulk = result["hol"]["bulk"]
        ax_h.set(yscale="log", ylabel="one-text query latency, ms",
                 title=f"Head-of-line: queries during one {bulk['texts']}-text request")
        ax_h.legend(fontsize=7)
        ax_h.grid(True, axis="y", alpha=0.3)
    else:
        ax_h.axis("off")
    fwd = result.get("forward", {})
    if fwd.get("raw"):
        bars = {"tokenize": fwd["raw"]["tokenize_ms"], "raw forward": fwd["raw"]["forward_ms"]}
        bars |= {f"service p50 ({k})": v for k, v in fwd.get("service_p50_ms", {}).items()}
        ax_r.barh(list(bars), list(bars.values()), color="tab:green")
        ax_r.axvline(fwd["raw"]["forward_ms"] + GOAL_GAP_MS, color="tab:red", linestyle=":",
                     label=f"goal: forward + {GOAL_GAP_MS:g} ms")
        ax_r.axvline(fwd["raw"]["forward_ms"] * GOAL_RATIO, color="tab:purple", linestyle="--",
                     label=f"goal: {GOAL_RATIO:g} x forward")
        ax_r.invert_yaxis()
        ax_r.set(xlabel="ms (medians)", title="One client against the raw forward pass")
        ax_r.legend(fontsize=7)
        ax_r.grid(True, axis="x", alpha=0.3)
    else:
        ax_r.axis("off")


def tables(result: dict[str, Any]) -> str:
    """Markdown tables of every part that ran, and the goals."""
    out: list[str] = [f"Versions: {name}: " + ", ".join(f"{k} {v}" for k, v in found.items())
                      for name, found in result.get("versions", {}).items() if found]
    if result.get("vllm_threads"):
        out.append("vLLM's model threads: " + ", ".join(f"{k} {v}" for k, v in result["vllm_threads"].items()))
    if "vllm" in result.get("skipped", {}):
        out.append(f"vLLM skipped: {result['skipped']['vllm']}")
    out += cold_start_table(result.get("cold_start", {}))
    sweeps = (("systems", "Concurrency sweep (httpx closed loops, one sentence a request)", "texts_per_s",
               "server_cpu_ms_per_text"),
              ("systems_wrk", "The sweep's HTTP points by wrk (a client that leaves the cores to the server)",
               "requests_per_s", "server_cpu_ms_per_request"))
    for key, title, rate, cpu in sweeps:
        if not result.get(key):
            continue
        out += ["", title, "", "| system | clients | texts/s | p50 ms | p99 ms | server CPU ms/text |",
                "|---|---:|---:|---:|---:|---:|"]
        for name, by_c in result[key].items():
            for c, p in by_c.items():
                out.append(f"| {name} | {c} | {fmt(p.get(rate))} | {fmt(p.get('p50_ms'))} | "
                           f"{fmt(p.get('p99_ms'))} | {fmt(p.get(cpu))} |")
    if result.get("systems_wrk"):
        out += [f"- {k}: " + ", ".join(f"{fmt(v, 2)} @{c}" for c, v in by_c.items())
                for k, by_c in result.get("ratios", {}).items() if "(wrk)" in k]
    zc = result.get("zero_cost", {})
    if zc.get("systems"):
        high, low = zc["connections"]
        partial = " (interrupted: partial)" if zc.get("interrupted") else ""
        out += ["", f"Zero-cost model (1 layer, 32 wide), {zc['load_client']}{partial}", "",
                f"| system | req/s @{high} | p50 ms @{high} | p99 ms @{high} | p50 ms @{low} | p99 ms @{low} "
                f"| server CPU ms/req @{high} |", "|---|---:|---:|---:|---:|---:|---:|"]
        for name, by_c in zc["systems"].items():
            h, lo = by_c.get(str(high), {}), by_c.get(str(low), {})
            out.append(f"| {ZERO_COST_LABELS.get(name, name)} | {fmt(h.get('requests_per_s'), 0)} | "
                       f"{fmt(h.get('p50_ms'), 2)} | {fmt(h.get('p99_ms'), 2)} | {fmt(lo.get('p50_ms'), 2)} | "
                       f"{fmt(lo.get('p99_ms'), 2)} | {fmt(h.get('server_cpu_ms_per_request'), 2)} |")
        out += [f"- {k}: {fmt(v, 3)}" for k, v in zc.get("ratios", {}).items()]
        out += [f"- left out, did not start or answer: {k}: {(v.strip().splitlines() or [''])[-1][:200]}"
                for k, v in zc.get("failed", {}).items()]
    elif "zero_cost" in result:
        out += ["", f"Zero-cost model rows skipped: {zc.get('skipped')}"]
    hol_part_ = result.get("hol", {})
    if hol_part_.get("targets"):
        bulk = hol_part_["bulk"]
        out += ["", f"Head-of-line: one request of {bulk['texts']} texts ({bulk['words_per_text']} words each) "
                    "while one client sends one-text queries", "",
                "| system | idle p50 ms | p50 ms during bulk | worst ms during bulk | queries during bulk "
                "| bulk alone s | bulk with queries s | bulk slowdown |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name, s in hol_part_["targets"].items():
            slowdown = s.get("bulk_slowdown")
            out.append(f"| {name} | {fmt(s.get('idle_p50_ms'))} | {fmt(s.get('query_p50_ms'))} | "
                       f"{fmt(s.get('query_worst_ms'), 0)} | {fmt(s.get('queries_during_bulk'), 0)} | "
                       f"{fmt(s.get('bulk_alone_s'), 2)} | {fmt(s.get('bulk_with_queries_s'), 2)} | "
                       f"{'–' if slowdown is None else f'{100 * slowdown:+.1f} %'} |")
    mixed = result.get("mixed", {})
    if mixed.get("texts_per_s"):
        from bench.mixed import table as mixed_table

        out += ["", f"Mixed lengths: {mixed['request']}; {mixed['bulk']}", "", mixed_table(mixed)]
    fwd = result.get("forward", {})
    if fwd.get("raw"):
        raw = fwd["raw"]
        out += ["", f"One client against the raw forward pass ({raw['dtype']}, {raw['torch_threads']} torch threads, "
                    f"median of {raw['runs']})", "",
                "| raw forward ms | tokenize ms | service p50 ms | service p50 - forward ms | p50 / forward |",
                "|---:|---:|---|---|---:|"]
        p50s = ", ".join(f"{v:.2f} ({k})" for k, v in fwd.get("service_p50_ms", {}).items()) or "–"
        gaps = ", ".join(f"{v:+.2f} ({k})" for k, v in fwd.get("gap_ms", {}).items()) or "–"
        out.append(f"| {raw['forward_ms']:.2f} | {raw['tokenize_ms']:.2f} | {p50s} | {gaps} | "
                   f"{fmt(fwd.get('p50_over_forward'), 3)} |")
    if "images" in result:
        out += images_table(result["images"])
    if result.get("peer_rss", {}).get("systems"):
        out += rss_table(result["peer_rss"])
    if result.get("goals"):
        out += ["", "Goals", ""] + [f"- {k}: {fmt(v)}" for k, v in result["goals"].items()]
    return "\n".join(out)


def count_errors(result: dict[str, Any]) -> int:
    """Failed requests of every part: any makes the run exit 1."""
    errors = sum(p["errors"] for s in result.get("systems", {}).values() for p in s.values())
    errors += sum(p["errors"] for p in result.get("images", {}).get("points", {}).values())
    errors += sum(p["errors"] for s in result.get("zero_cost", {}).get("systems", {}).values() for p in s.values())
    one_client = result.get("forward", {}).get("service_one_client", {})
    errors += sum(v for k, v in one_client.items() if k.endswith("_errors"))
    errors += sum("error" in t for t in result.get("hol", {}).get("targets", {}).values())
    errors += len(result.get("zero_cost", {}).get("failed", {}))
    errors += sum(v for s in result.get("mixed", {}).get("texts_per_s", {}).values() for k, v in s.items()
                  if k.endswith("_errors"))
    return errors
