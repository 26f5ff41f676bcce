"""Plots and tables of gpu_services_bench.py's results (parts 3 and 5 of issue 4)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np


def plot(res: dict, out: Path, stamp: str, log: Callable[[str], None]) -> list[str]:
    """Part 3: tokens/s per configuration next to the model, pipelined hit rate; part 5: load curves."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib not installed: no plots")
        return []
    files = []
    if "part3" in res and res["part3"].get("rows"):
        p3 = res["part3"]
        fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
        base = p3["plain"]["tok_s"]
        labels, meas, model = ["plain"], [base], [base]
        for r in p3["rows"]:
            labels.append(f"a={r['alpha']}\n{r['mode'][:4]}")
            meas.append(r["tok_s"])
            model.append(base * r["predicted_speedup"])
        x = np.arange(len(labels))
        ax[0].bar(x, meas, color=["gray"] + ["tab:blue" if "seq" in lab else "tab:orange" for lab in labels[1:]])
        ax[0].scatter(x, model, marker="_", s=600, color="k", label="performance model", zorder=3)
        for xi, m in zip(x, meas, strict=True):
            ax[0].annotate(f"{m / base:.2f}x", (xi, m), ha="center", va="bottom", fontsize=8)
        ax[0].set_xticks(x, labels)
        ax[0].set_ylabel("tokens/s (1 session)")
        ax[0].set_title(f"Part 3: speculation through the gateway, k={p3['k']}")
        ax[0].legend()
        pipe = [r for r in p3["rows"] if r["mode"] == "pipelined"]
        ax[1].plot([r["alpha"] for r in pipe], [r["pipelined_share"] for r in pipe], "o-", label="measured")
        ax[1].plot([r["alpha"] for r in pipe], [r["prediction"]["pipelined_hit_rate"] for r in pipe], "k--",
                   label="alpha^(k+1)")
        ax[1].set_xlabel("alpha")
        ax[1].set_ylabel("rounds served by the pipelined guess")
        ax[1].legend()
        fig.suptitle(f"{res['shape']}: random weights; acceptance set by an oracle drafter (benchmark only)", fontsize=9)
        fig.tight_layout()
        files.append(str(out / f"gpu_services_part3_{stamp}.png"))
        fig.savefig(files[-1], dpi=120)
        plt.close(fig)
    if "part5" in res and res["part5"].get("rows"):
        rows = res["part5"]["rows"]
        fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
        for mode, c in (("plain", "gray"), ("speculative", "tab:orange")):
            rs = [r for r in rows if r["mode"] == mode]
            xs = [r["sessions"] for r in rs]
            ax[0].plot(xs, [r["agg_tok_s"] for r in rs], "o-", color=c, label=mode)
            ax[1].plot(xs, [r["tpot_ms_p50"] or np.nan for r in rs], "o-", color=c, label=f"{mode} p50")
            ax[1].plot(xs, [r["tpot_ms_p99"] or np.nan for r in rs], "s--", color=c, label=f"{mode} p99")
        for a_ in ax:
            a_.set_xscale("log", base=2)
            a_.set_xlabel("concurrent sessions")
            a_.legend()
        ax[0].set_ylabel("aggregate tokens/s")
        ax[1].set_ylabel("time per output token (ms)")
        ax[0].set_title(f"Part 5: load, alpha={res['part5']['alpha']}, adaptive k <= {res['part5']['k_max']}")
        fig.tight_layout()
        files.append(str(out / f"gpu_services_part5_{stamp}.png"))
        fig.savefig(files[-1], dpi=120)
        plt.close(fig)
    return files


def print_tables(res: dict) -> None:
    """Markdown tables of both parts and of the goals, on stdout."""
    if "part3" in res and "plain" in res["part3"]:
        p3 = res["part3"]
        print("\n| part 3 | tok/s | speedup | model | share of model | tok/round | pipelined | identical |")
        print("|---|---|---|---|---|---|---|---|")
        print(f"| plain | {p3['plain']['tok_s']:.1f} | 1.00 | | | 1.00 | | |")
        for r in p3["rows"]:
            print(f"| alpha {r['alpha']} {r['mode']} | {r['tok_s']:.1f} | {r['speedup']:.2f} | "
                  f"{r['predicted_speedup']:.2f} | {r['share_of_prediction']:.0%} | {r['tokens_per_round']:.2f} | "
                  f"{r['pipelined_share']:.0%} | {r['outputs']['identical']}/{r['outputs']['checked']} |")
    if "part5" in res:
        print("\n| part 5 | sessions | agg tok/s | TPOT p50 ms | TPOT p99 ms | mean block | target batch | identical |")
        print("|---|---|---|---|---|---|---|---|")
        for r in res["part5"]["rows"]:
            print(f"| {r['mode']} | {r['sessions']} | {r['agg_tok_s']:.1f} | {r['tpot_ms_p50'] or 0:.2f} | "
                  f"{r['tpot_ms_p99'] or 0:.2f} | {r['mean_block']:.2f} | {r['target_mean_batch']:.1f} | "
                  f"{r['outputs']['identical']}/{r['outputs']['checked']} |")
    print("\n| goal | value | target | met |\n|---|---|---|---|")
    for k, g in res["goals"].items():
        v = g["value"]
        print(f"| {k} | {v:.3f} | {g['goal']} | {'yes' if g['met'] else 'NO'} |" if isinstance(v, float)
              else f"| {k} | {v} | {g['goal']} | {'yes' if g['met'] else 'NO'} |")
