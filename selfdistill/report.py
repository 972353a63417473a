"""Reports: the HTML page `selfdistill report` writes, and the summary table the demo prints.

The page is one self-contained file (plots embedded as PNG) a person opens in a browser: held-out
accuracy per round for candidate and incumbent with confidence intervals, pairs and examples per
round, phase durations, judge health, the decisions with their reasons, and sample answers of the
base and the current checkpoint on the same held-out items (so a reader can see whether a gain is
real or a change of style). Reads the store only; safe while the daemon runs.
"""

from __future__ import annotations

import base64
import html
import io
import time
from pathlib import Path
from typing import Any

from selfdistill.records import readable
from selfdistill.store import DB_NAME, Store


def _collect(store: Store) -> dict[str, Any]:
    rounds = store.rounds()
    phases = store.phases()
    heldout = store.evaluations("heldout")
    pairs = store.query("SELECT round_id, count(*) AS n FROM pairs GROUP BY round_id")
    sft = store.query("SELECT round_id, count(*) AS n FROM sft_examples GROUP BY round_id")
    judges = store.judge_checks()
    return {"rounds": rounds, "teacher_usage": {r["id"]: store.teacher_usage(r["id"]) for r in rounds},
            "phases": phases, "heldout": heldout, "pairs": {r["round_id"]: r["n"] for r in pairs},
            "sft": {r["round_id"]: r["n"] for r in sft}, "judges": judges}


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def _plots(d: dict[str, Any]) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out = {}
    trained = [r for r in d["rounds"] if r["decision"] in ("promote", "reject")]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    if trained:
        for key, label, color, dx in (("incumbent", "incumbent", "tab:gray", -0.06), ("candidate", "candidate", "tab:blue", 0.06)):
            xs = [r["id"] + dx for r in trained]  # side by side, so the two intervals stay readable
            ys = [r["metrics"].get(f"{key}_accuracy") for r in trained]
            ci = [r["metrics"].get(f"{key}_ci") or [y, y] for r, y in zip(trained, ys)]
            lo = [y - c[0] if y is not None and c[0] is not None else 0 for y, c in zip(ys, ci)]
            hi = [c[1] - y if y is not None and c[1] is not None else 0 for y, c in zip(ys, ci)]
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=label, color=color)
        for r in trained:
            if r["decision"] == "promote":
                ax.annotate("promoted", (r["id"] + 0.06, r["metrics"].get("candidate_accuracy") or 0),
                            textcoords="offset points", xytext=(0, 8), ha="center", fontsize=8)
        ids = [r["id"] for r in trained]
        ax.set_xlim(min(ids) - 0.5, max(ids) + 0.5)
        ax.set_xticks(ids)
    ax.set_xlabel("round")
    ax.set_ylabel("held-out accuracy (95% CI)")
    ax.set_title("Held-out accuracy per round")
    ax.legend(loc="best")
    out["accuracy"] = _png(fig)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3))
    ids = [r["id"] for r in d["rounds"]]
    ax.bar([i - 0.2 for i in ids], [d["pairs"].get(i, 0) for i in ids], width=0.4, label="pairs")
    ax.bar([i + 0.2 for i in ids], [d["sft"].get(i, 0) for i in ids], width=0.4, label="SFT examples")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_title("Training data gathered per round")
    ax.legend()
    out["data"] = _png(fig)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3))
    names = ["sample", "generate", "score", "pair", "train", "evaluate", "decide", "promote"]
    bottom = {i: 0.0 for i in ids}
    for name in names:
        vals = {i: 0.0 for i in ids}
        for p in d["phases"]:
            if p["phase"] == name and p["round_id"] in vals:
                vals[p["round_id"]] += p["duration_s"] or 0
        if any(vals.values()):
            ax.bar(ids, [vals[i] for i in ids], bottom=[bottom[i] for i in ids], label=name)
            for i in ids:
                bottom[i] += vals[i]
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("seconds")
    ax.set_title("Phase durations")
    ax.legend(fontsize=7, ncol=4)
    out["phases"] = _png(fig)
    plt.close(fig)

    if d["judges"]:
        fig, ax = plt.subplots(figsize=(7, 3))
        for judge in sorted({j["judge"] for j in d["judges"]}):
            rows = [j for j in d["judges"] if j["judge"] == judge]
            xs = [j["round_id"] if j["round_id"] is not None else 0 for j in rows]  # 0: checked before the first round
            ax.plot(xs, [j["agreement"] or 0 for j in rows], marker="o", label=f"{judge}: agreement")
            ax.plot(xs, [j["position_bias"] or 0 for j in rows], marker="x", linestyle="--", label=f"{judge}: position bias")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round of the check")
        ax.set_title("Judge health")
        ax.legend(fontsize=7)
        out["judges"] = _png(fig)
        plt.close(fig)
    return out


def _samples(store: Store, n: int = 8) -> list[dict[str, Any]]:
    """Base and current answers to the same held-out items: where they differ, first."""
    cur = store.current_checkpoint()["id"]
    base = store.latest_evaluation("base", "heldout")
    now = store.latest_evaluation(cur, "heldout") if cur != "base" else None
    if base is None:
        return []
    tasks = {t.id: t for t in store.tasks(ids=[i["task_id"] for i in base["items"]])}
    mine = {i["task_id"]: i for i in (now["items"] if now else [])}
    rows = []
    for it in base["items"]:
        other = mine.get(it["task_id"])
        t = tasks[it["task_id"]]
        rows.append({"prompt": readable(t.prompt), "answer": t.answer, "base": it["text"], "base_ok": it["correct"],
                     "current": other["text"] if other else None, "current_ok": other["correct"] if other else None})
    rows.sort(key=lambda r: (r["current_ok"] == r["base_ok"], r["task_id"] if "task_id" in r else 0))
    return rows[:n]


def write_report(policy, out: Path | None = None) -> Path:
    store = Store.open(policy.state_dir / DB_NAME, readonly=True)
    try:
        d = _collect(store)
        plots = _plots(d)
        samples = _samples(store)
        cur = store.current_checkpoint()["id"]
        base = store.latest_evaluation("base", "heldout")
        now = store.latest_evaluation(cur, "heldout")
    finally:
        store.close()
    out = out or policy.state_dir / "reports" / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    e = html.escape

    def acc(ev) -> str:
        if not ev:
            return "-"
        m = ev["metrics"]
        if m["accuracy"] is None:
            return f"not measured (none of its {m.get('unverified', 0)} items has a verifier)"
        return f"{m['accuracy']:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}] on {m['n']} items"

    rows = "".join(
        f"<tr><td>{r['id']}</td><td>{e(r['phase'])}</td><td>{e(r['decision'] or '-')}</td><td>{e(r['incumbent_id'] or '')}</td>"
        f"<td>{e(r['candidate_id'] or '')}</td><td>{_f(r['metrics'].get('incumbent_accuracy'))}</td><td>{_f(r['metrics'].get('candidate_accuracy'))}</td>"
        f"<td>{_f(r['metrics'].get('p_value'))}</td>"
        f"<td>{e(_rl_cell(r['metrics'], d['teacher_usage'][r['id']]))}</td><td>{e('; '.join(r['reasons'] or []))}</td></tr>"
        for r in d["rounds"]
    )
    sample_rows = "".join(
        f"<tr><td><pre>{e(s['prompt'])}</pre></td><td>{e(str(s['answer']))}</td><td class='{'ok' if s['base_ok'] else 'bad'}'><pre>{e(s['base'])}</pre></td>"
        f"<td class='{'ok' if s['current_ok'] else 'bad'}'><pre>{e(s['current'] or '-')}</pre></td></tr>"
        for s in samples
    )
    judge_rows = "".join(_judge_row(j) for j in d["judges"])
    judges = ("<h2>Judge checks</h2><p>Each measurement of a judge on its anchors, oldest first (re-measured every "
              "<code>recheck_every_rounds</code> and whenever the teacher labels new anchors); an unhealthy judge scores nothing "
              "until a later check passes.</p><table><tr><th>round</th><th>judge</th><th>healthy</th><th>agreement</th>"
              "<th>position bias</th><th>distinct scores</th><th>unparseable</th><th>items</th><th>anchors: file / teacher / verifier</th>"
              f"<th>reasons</th></tr>{judge_rows}</table>") if judge_rows else ""
    imgs = "".join(f"<h2>{e(k.title())}</h2><img alt='{e(k)}' src='data:image/png;base64,{v}'>" for k, v in plots.items())
    out.write_text(f"""<!doctype html><html><head><meta charset="utf-8"><title>selfdistill report: {e(policy.name)}</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}} table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 6px;vertical-align:top}} pre{{white-space:pre-wrap;margin:0;max-width:330px}}
.ok{{background:#e6ffe6}} .bad{{background:#ffecec}}</style></head><body>
<h1>selfdistill: {e(policy.name)}</h1>
<p>Generated {time.strftime('%Y-%m-%d %H:%M:%S')}. Current checkpoint: <b>{e(cur)}</b>.
Base held-out accuracy {acc(base)}; current {acc(now)}. Correct means the verifier's full score (partial credit counts as wrong).</p>
{imgs}
<h2>Rounds</h2><table><tr><th>round</th><th>phase</th><th>decision</th><th>incumbent</th><th>candidate</th>
<th>inc. acc</th><th>cand. acc</th><th>p</th><th>RL: reward / pass / clip / KL from the sampler / KL to the reference; distill: reverse KL / teacher tokens;
teacher tokens by use</th><th>reasons</th></tr>{rows}</table>
{judges}
<h2>Sample answers (same held-out items)</h2><table><tr><th>question</th><th>reference</th><th>base</th><th>current ({e(cur)})</th></tr>{sample_rows}</table>
</body></html>""")
    return out


def _judge_row(j: dict[str, Any]) -> str:
    """One judge_health row: when, which judge, its figures, where its anchor items came from, why."""
    det = j["details"] or {}
    a = det.get("anchors") or {}
    src = " / ".join(str(a.get(k, "-")) for k in ("file_items", "teacher_items", "verifier_items"))
    e = html.escape
    return (f"<tr><td>{j['round_id'] if j['round_id'] is not None else '-'}</td><td>{e(j['judge'])}</td>"
            f"<td class='{'ok' if j['healthy'] else 'bad'}'>{'yes' if j['healthy'] else 'no'}</td><td>{_f(j['agreement'])}</td>"
            f"<td>{_f(j['position_bias'])}</td><td>{j['distinct_scores'] if j['distinct_scores'] is not None else '-'}</td>"
            f"<td>{_f(det.get('unparseable'))}</td><td>{det.get('n', '-')}</td><td>{e(src)}</td>"
            f"<td>{e('; '.join(det.get('reasons') or []))}</td></tr>")


def _rl_cell(metrics: dict[str, Any], used: dict[str, dict[str, int]] | None = None) -> str:
    """A round's policy-gradient figures (mean reward, pass rate, clip fraction, KL from the sampling
    policy, KL to the reference where penalised), its
    distillation's (reverse KL to the teacher on the incumbent's samples, teacher tokens scored)
    and what the teacher cost it (tokens by use, store.teacher_usage)."""
    rl, d = metrics.get("rl"), metrics.get("distill")
    parts = []
    if rl:
        parts.append(" / ".join(_f(rl.get(k)) for k in ("reward_mean", "pass_rate", "clip_fraction", "policy_kl", "kl")))
    if d:
        parts.append(f"distill {_f(d.get('reverse_kl_before'))} / {d.get('teacher_tokens', '-')}")
    if used:
        parts.append("teacher " + ", ".join(f"{k} {v['tokens']}" for k, v in used.items()) + " tokens")
    return "; ".join(parts) or "-"


def _p(v: Any) -> str:
    if not isinstance(v, (int, float)):
        return "-"
    return f"{v:.2e}" if v < 1e-3 else f"{v:.4f}"


def _f(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) else "-"


def summary_rows(store: Store) -> list[dict[str, Any]]:
    """Base accuracy and accuracy after each promotion, with CIs; each promotion's p-value against
    its incumbent (the gate's) and against the base (exact one-sided McNemar on the items both answered);
    and, where measured, each one's audit accuracy (`audit`: items no gate or decision read)."""
    from selfdistill import stats

    def with_audit(row: dict[str, Any]) -> dict[str, Any]:
        au = store.latest_evaluation(row["checkpoint"], "audit")
        if au:
            row["audit"] = {k: au["metrics"][k] for k in ("accuracy", "ci_low", "ci_high", "n")}
        return row

    rows = []
    base = store.latest_evaluation("base", "heldout")
    if base:
        rows.append(with_audit({"checkpoint": "base", "round": "-", **{k: base["metrics"][k] for k in ("accuracy", "ci_low", "ci_high", "n")}}))
    for r in store.rounds():
        if r["decision"] == "promote":
            # the figure that promoted it: its evaluation in its own round (under rotating gate items its
            # later ones, as an incumbent, are on other windows)
            ev = store.latest_evaluation(r["candidate_id"], "heldout", round_id=r["id"]) or store.latest_evaluation(r["candidate_id"], "heldout")
            if ev:
                row = {"checkpoint": r["candidate_id"], "round": r["id"], **{k: ev["metrics"][k] for k in ("accuracy", "ci_low", "ci_high", "n")},
                       "p_value": r["metrics"].get("p_value")}
                mine = {i["task_id"]: bool(i["correct"]) for i in ev["items"] if i["correct"] is not None}
                # the items the base answered too: all of them, unless the gate's items rotate (evaluation.gate_items)
                base_items = {t: bool(i["correct"]) for t, i in store.answers_of("base", "heldout", mine).items() if i["correct"] is not None}
                ids = sorted(set(mine) & set(base_items))
                if ids:
                    wins, losses = stats.discordant([mine[i] for i in ids], [base_items[i] for i in ids])
                    row["gain_vs_base"] = (wins - losses) / len(ids)
                    row["p_vs_base"] = stats.mcnemar_one_sided(wins, losses)
                rows.append(with_audit(row))
    return rows


def print_summary(policy, store: Store) -> None:
    """The table `make demo` ends with: accuracy per promotion with CIs, and time per phase."""
    rows = summary_rows(store)
    print("\n== selfdistill summary ==")
    audit = any("audit" in r for r in rows)  # the figure nothing was chosen on comes first
    head = f"{'audit acc':>9} {'95% CI':>17} {'n':>4}  " if audit else ""
    print(f"{'checkpoint':14} {'round':>5} {head}{'held-out acc':>12} {'95% CI':>17} {'n':>5} {'p vs prev':>9} {'gain vs base':>12} {'p vs base':>9}")
    for r in rows:
        ci = f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]" if r["accuracy"] is not None else "(no verifier)"
        gain = f"{r['gain_vs_base']:+.3f}" if "gain_vs_base" in r else "-"
        a = r.get("audit")
        cell = ""
        if audit:
            cell = (f"{a['accuracy']:9.3f} {'[%.3f, %.3f]' % (a['ci_low'], a['ci_high']):>17} {a['n']:4}  " if a and a["accuracy"] is not None
                    else f"{'-':>9} {'':>17} {'':>4}  ")
        print(f"{r['checkpoint']:14} {str(r['round']):>5} {cell}{_f(r['accuracy']):>12} {ci:>17} {r['n']:5} "
              f"{_p(r.get('p_value')):>9} {gain:>12} {_p(r.get('p_vs_base')):>9}")
    totals: dict[str, float] = {}
    for p in store.phases():
        totals[p["phase"]] = totals.get(p["phase"], 0.0) + (p["duration_s"] or 0.0)
    print("time per phase: " + ", ".join(f"{k} {v:.0f}s" for k, v in totals.items()) + f"; total {sum(totals.values()):.0f}s")
    decisions = [f"#{r['id']} {r['decision']}" for r in store.rounds() if r["decision"]]
    print("decisions: " + (", ".join(decisions) or "none"))
    stop = store.events("stop", limit=1)
    if stop:
        print(f"stopped: {stop[0]['message']}")
