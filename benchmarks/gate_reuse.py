"""Does a promoted checkpoint look better on the held-out items that promoted it than on the others?

The gate re-tests on held-out items; with `evaluation.gate_items = "fixed"` every round uses the same
ones, so the incumbent a later candidate must beat was chosen for its answers to exactly those items.
This measures that selection effect on a finished run's store: one vLLM engine (the policy's
[engine] table) answers every held-out item greedily with the base and with each promoted
checkpoint, and for each promotion reports its accuracy on the window of items its round's gate
used, on the rest of the held-out pool, and the same two figures for the base (which tells a harder
or easier window from a lucky one):

    selection effect = (promoted on its window - promoted off it) - (base on that window - base off it)

It also answers the whole pool with every round's candidate whose adapter is still on disk (rejected
ones too) and repeats each round's paired test (exact one-sided McNemar, candidate against the
round's incumbent) on the whole pool: would a gate on every held-out item have decided otherwise?

Run on the store of a `benchmarks/distill.py` arm (its policy.toml), for example:

    .venv/bin/python benchmarks/gate_reuse.py /tmp/b19/rot/loop_rotate/policy.toml --out /tmp/b19/reuse.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from learning import greedy_scorer, student_engine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("policy", type=Path, help="the policy whose state holds the finished run")
    ap.add_argument("--out", type=Path, help="write the JSON figures here too")
    args = ap.parse_args()

    from selfdistill.config import load_policy
    from selfdistill.engines.base import AdapterRef
    from selfdistill.store import DB_NAME, Store

    policy = load_policy(args.policy)
    store = Store.open(policy.state_dir / DB_NAME, readonly=True)
    try:
        pool = store.tasks(split="heldout")
        paths = {c.id: c.path for c in store.checkpoints()}
        promotions, decided = [], []
        for r in store.rounds():
            if r.decision in ("promote", "reject") and r.candidate_id and paths.get(r.candidate_id) \
                    and Path(paths[r.candidate_id]).is_dir():
                decided.append({"round": r.id, "incumbent": r.incumbent_id, "candidate": r.candidate_id, "decision": r.decision})
            if r.decision != "promote":
                continue
            raw = store.get_meta(f"gate_items:{r.id}")  # kept since 2026-12-07; before, the first heldout_items
            window = json.loads(raw) if raw else [t.id for t in pool[: policy.evaluation.heldout_items]]
            promotions.append({"round": r.id, "checkpoint": r.candidate_id, "window": window})
    finally:
        store.close()

    engine = student_engine(policy, policy.state_dir / "cache" / "gate-reuse")  # not beside a shipped policy file
    score = greedy_scorer(policy, engine)
    right: dict[str, dict[int, bool]] = {}
    try:
        names = ["base", *(p["checkpoint"] for p in promotions), *(c for d in decided for c in (d["incumbent"], d["candidate"]))]
        for name in dict.fromkeys(names):  # each once, in that order
            adapter = None
            if name != "base":
                engine.load_adapter(AdapterRef(name=name, path=paths[name]))
                adapter = name
            right[name] = {t.id: bool(c) for t, c in zip(pool, score(pool, adapter))}
    finally:
        engine.close()

    def acc(name: str, ids) -> float:
        ids = list(ids)
        return sum(right[name][i] for i in ids) / len(ids) if ids else float("nan")

    rows = []
    for p in promotions:
        inside = set(p["window"])
        outside = [t.id for t in pool if t.id not in inside]
        on, off = acc(p["checkpoint"], inside), acc(p["checkpoint"], outside)
        b_on, b_off = acc("base", inside), acc("base", outside)
        rows.append({"round": p["round"], "checkpoint": p["checkpoint"], "window": len(inside), "rest": len(outside),
                     "on_window": round(on, 4), "off_window": round(off, 4), "base_on_window": round(b_on, 4),
                     "base_off_window": round(b_off, 4), "selection_effect": round((on - off) - (b_on - b_off), 4)})
    from selfdistill.stats import discordant, mcnemar_one_sided

    ids = [t.id for t in pool]
    for d in decided:
        w, lo = discordant([right[d["candidate"]][i] for i in ids], [right[d["incumbent"]][i] for i in ids])
        d.update(pool_incumbent=round(acc(d["incumbent"], ids), 4), pool_candidate=round(acc(d["candidate"], ids), 4),
                 pool_wins=w, pool_losses=lo, pool_p=round(mcnemar_one_sided(w, lo), 4))
    doc = {"policy": str(args.policy), "heldout_pool": len(pool), "gate_items": policy.evaluation.gate_items,
           "alpha": policy.gates.alpha, "all_items": {n: round(acc(n, right[n]), 4) for n in right}, "promotions": rows,
           "rounds": decided}
    print(json.dumps(doc, indent=2))
    print("| round | checkpoint | its gate window: promoted / base | the other held-out items: promoted / base | selection effect |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['round']} | {r['checkpoint']} | {r['on_window']:.3f} / {r['base_on_window']:.3f} (n = {r['window']}) "
              f"| {r['off_window']:.3f} / {r['base_off_window']:.3f} (n = {r['rest']}) | {r['selection_effect']:+.3f} |")
    print(f"\n| round | decision | whole pool (n = {len(pool)}): incumbent -> candidate | wins / losses | one-sided p |")
    print("|---|---|---|---|---|")
    for d in decided:
        print(f"| {d['round']} | {d['decision']} | {d['incumbent']} {d['pool_incumbent']:.3f} -> {d['candidate']} "
              f"{d['pool_candidate']:.3f} | {d['pool_wins']} / {d['pool_losses']} | {d['pool_p']:.2g} |")
    if args.out:
        args.out.write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
