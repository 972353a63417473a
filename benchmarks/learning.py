"""Does the loop make the bundled student better, and better than plain SFT for the same steps?

One run, one set of held-out items:

1. a copy of a policy (default policies/cpu-demo.toml) with its own state_dir under --out, an
   audit split (`tasks.audit_fraction`), no wall clock or plateau stop, and any sizes given on the
   command line (by default the policy's own), run by the real daemon (`selfdistill init`, then
   `selfdistill run POLICY --burst --max-rounds N`);
2. the per-round held-out accuracies the daemon's gates measured (incumbent and candidate, Wilson
   95% intervals, McNemar p) and each round's wall time, from its store;
3. baselines trained after the loop: plain SFT with the daemon's own training child, from the base,
   on the reference answers of the same training tasks the loop sampled (teacher labelling), for
   the optimizer steps of the final checkpoint's lineage (SFT + DPO steps), or, when no round was
   promoted, for every step the loop spent;
4. an audit: the store's audit split (tasks never trained on and never seen by a gate), on which
   the base, the loop's final checkpoint and the SFT baseline are scored, as on the gate's items,
   by one engine built from the policy's [engine] table, greedy, with the project's verifiers;
   paired McNemar p.

Run (about 30 minutes on 2 quiet CPU cores with the demo policy's sizes):

    .venv/bin/python benchmarks/learning.py --out bench-out/learning

It prints a JSON summary and a Markdown table (also written to OUT/learning.json, OUT/learning.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def dump_toml(data: dict[str, Any]) -> str:
    """Enough TOML for a policy: scalars, lists of scalars, tables, arrays of tables."""

    def val(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {val(x)}" for k, x in v.items()) + " }"
        raise TypeError(type(v))

    out: list[str] = []

    def table(prefix: str, d: dict[str, Any]) -> None:
        scalars = {k: v for k, v in d.items() if not isinstance(v, dict) and not (isinstance(v, list) and v and isinstance(v[0], dict))}
        for k, v in scalars.items():
            out.append(f"{k} = {val(v)}")
        for k, v in d.items():
            if k in scalars:
                continue
            name = f"{prefix}.{k}" if prefix else k
            if isinstance(v, dict):
                out.append(f"\n[{name}]")
                table(name, v)
            else:
                for item in v:
                    out.append(f"\n[[{name}]]")
                    table(name, item)

    table("", data)
    return "\n".join(out) + "\n"


def cell(fig: dict[str, Any]) -> str:
    """An accuracy as a table cell: "0.190 [0.125, 0.278] (n=100)"."""
    return f"{fig['accuracy']:.3f} [{fig['ci'][0]:.3f}, {fig['ci'][1]:.3f}] (n={fig['n']})"


def add_arm_options(ap: argparse.ArgumentParser, arms: tuple[str, ...], minutes: float, default: tuple[str, ...] | None = None) -> None:
    """The options every side-by-side benchmark of arms shares (`default`: the arms run unless
    --arms says otherwise; all of them when None)."""
    ap.add_argument("--minutes", type=float, default=minutes, help="wall-clock budget of each arm's daemon run")
    ap.add_argument("--rounds", type=int, default=100, help="at most this many rounds an arm (the clock decides unless smaller)")
    ap.add_argument("--arms", default=",".join(default or arms), help=f"comma-separated, of {', '.join(arms)} (default: %(default)s)")
    ap.add_argument("--audit", type=int, default=300, help="audit items scored (at most)")


def chosen_arms(a: argparse.Namespace, arms: tuple[str, ...]) -> list[str]:
    chosen = [x for x in a.arms.split(",") if x]
    if unknown := [x for x in chosen if x not in arms]:
        raise SystemExit(f"--arms: unknown arm(s) {', '.join(unknown)}; choose from {', '.join(arms)}")
    return chosen


def make_policy(src: Path, out: Path, a: argparse.Namespace) -> Path:
    data = tomllib.loads(src.read_text())
    data["name"] = "bench-learning"
    data["state_dir"] = str((out / "state").resolve())
    tasks = data.setdefault("tasks", {})
    tasks["audit_fraction"] = a.audit_fraction
    tr = data.setdefault("training", {})
    for table, key, v in ((tasks, "per_round", a.per_round), (data.setdefault("generation", {}), "samples_per_task", a.samples),
                          (data.setdefault("evaluation", {}), "heldout_items", a.heldout),
                          (tr, "epochs", a.epochs), (tr, "dpo_epochs", a.dpo_epochs)):
        if v is not None:
            table[key] = v
    st = data.setdefault("stopping", {})
    a.rounds = a.rounds or st.get("max_rounds") or 4
    st["max_rounds"] = a.rounds
    st.pop("max_wall_s", None)  # the benchmark sizes itself by rounds, not by a clock
    st.pop("plateau_rounds", None)
    data.setdefault("logging", {})["format"] = "json"
    p = out / "policy.toml"
    p.write_text(f"# written by benchmarks/learning.py from {src}\n" + dump_toml(data))
    return p


def student_engine(policy, cache_dir: Path):
    """One engine built from the policy's [engine] table on its base model (adapters loaded by name)."""
    from selfdistill.engines import make_engine
    from selfdistill.operations import base_model_dir

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(policy.engine.cpu_kv_cache_gib)))
    return make_engine(policy.engine, base_model_dir(policy), lora_rank=policy.student.lora.r, cache_dir=cache_dir)


def greedy_scorer(policy, engine):
    """score(tasks, adapter) -> each task's correctness (None: no verifier): `engine`'s greedy answers
    (adapter: a loaded adapter's name, None the base) to the policy's prompts (its prompt suffix,
    system prompt and evaluation.max_tokens), checked by the policy's verifiers, as the daemon's gate
    checks them."""
    from selfdistill.evaluation import evaluate_heldout
    from selfdistill.records import chat_messages
    from selfdistill.scoring.verifiers import resolve_verifier

    def verify(text, task):
        r = resolve_verifier(task, policy.tasks.default_verifier, policy.scoring, ())(text, task)
        return r.score, r.correct

    def score(tasks, adapter):
        res = evaluate_heldout(engine, adapter, tasks, verify,
                               lambda tk: chat_messages(tk.prompt + policy.tasks.prompt_suffix, policy.student.system_prompt),
                               policy.evaluation.max_tokens)
        return [it.correct for it in res.items]

    return score


def cli(*args: str, log: Path, timeout: float) -> int:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    with open(log, "a") as f:
        return subprocess.run([sys.executable, "-m", "selfdistill", *args], env=env, stderr=f, stdout=f, timeout=timeout).returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", type=Path, default=ROOT / "policies" / "cpu-demo.toml")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out" / "learning")
    # None: the policy's own value
    ap.add_argument("--rounds", type=int, default=None, help="rounds (default: stopping.max_rounds, else 4)")
    ap.add_argument("--per-round", type=int, default=None, help="tasks.per_round")
    ap.add_argument("--samples", type=int, default=None, help="generation.samples_per_task")
    ap.add_argument("--heldout", type=int, default=None, help="gate items (evaluation.heldout_items)")
    ap.add_argument("--audit-fraction", type=float, default=0.2, help="tasks.audit_fraction of the copy")
    ap.add_argument("--audit", type=int, default=300, help="audit items scored (at most)")
    ap.add_argument("--epochs", type=float, default=None, help="training.epochs")
    ap.add_argument("--dpo-epochs", type=float, default=None, help="training.dpo_epochs")
    a = ap.parse_args()

    from bootstrap import continue_sft, sft_rows, summary

    from selfdistill.config import load_policy
    from selfdistill.operations import base_model_dir
    from selfdistill.stats import discordant, mcnemar_one_sided
    from selfdistill.store import DB_NAME, Store

    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    policy_path = make_policy(a.policy, out, a)
    policy = load_policy(policy_path)
    log = out / "daemon.log"
    t0 = time.time()
    times: dict[str, float] = {}
    assert cli("init", str(policy_path), log=log, timeout=900) == 0, log.read_text()[-3000:]
    times["init_s"] = time.time() - t0
    t = time.time()
    rc = cli("run", str(policy_path), "--burst", "--max-rounds", str(a.rounds), log=log, timeout=3600)
    times["loop_s"] = time.time() - t
    assert rc in (0, 10), log.read_text()[-3000:]

    store = Store.open(policy.state_dir / DB_NAME, readonly=True)
    try:
        rounds = store.rounds()
        ckpts = {c["id"]: c for c in store.checkpoints()}
        current = store.current_checkpoint()
        gate_items = store.tasks(split="heldout", limit=policy.evaluation.heldout_items)
        audit = store.tasks(split="audit", limit=a.audit)
        used = sorted({t.id for r in rounds for t in store.round_tasks(r["id"])})
        train_tasks = store.tasks(ids=used) if used else []
        runs = [r for r in store.training_runs() if r["status"] == "succeeded"]
        per_round = []
        for r in rounds:
            m = r["metrics"] or {}
            per_round.append({
                "round": r["id"], "decision": r["decision"], "seconds": round((r["finished_at"] or 0) - (r["started_at"] or 0), 1),
                "incumbent": [m.get("incumbent_accuracy"), m.get("incumbent_ci")],
                "candidate": [m.get("candidate_accuracy"), m.get("candidate_ci")],
                "p": m.get("p_value"), "steps": (m.get("training") or {}).get("steps"),
            })
    finally:
        store.close()
    if not audit:
        raise SystemExit(f"{policy.state_dir}: the store has no audit tasks; give --audit-fraction above 0")

    lineage, c = [], current
    while c["id"] != "base":
        mt = (c["training"] or {}).get("metrics", {})
        lineage.insert(0, int(mt.get("sft_steps", 0)) + int(mt.get("dpo_steps", 0)))
        c = ckpts[c["parent_id"]]
    # the final checkpoint's steps; when no round was promoted, every step the loop spent, so the
    # baseline still says what plain SFT would have bought with the same training
    spent = sum(int((r["metrics"] or {}).get("sft_steps", 0)) + int((r["metrics"] or {}).get("dpo_steps", 0)) for r in runs)
    steps = sum(lineage) or spent
    t = time.time()
    sft = None
    if steps:
        sft = continue_sft(base_model_dir(policy), sft_rows(train_tasks, policy.tasks.prompt_suffix), [steps], out / "sft-baseline",
                           training=policy.training.model_dump(mode="json"), lora=policy.student.lora.model_dump(mode="json"),
                           system_prompt=policy.student.system_prompt)
    times["sft_baseline_s"] = time.time() - t

    from selfdistill.engines.base import AdapterRef

    t = time.time()
    engine = student_engine(policy, out / "cache")
    greedy = greedy_scorer(policy, engine)

    def score(tasks, adapter_dir, name):
        if adapter_dir is not None:
            engine.load_adapter(AdapterRef(name=name, path=str(adapter_dir)))
        return greedy(tasks, name if adapter_dir else None)

    models = {"base": None, "loop": Path(current["path"]) if current["id"] != "base" else None,
              "sft_baseline": sft["adapter"] if sft else None}
    results: dict[str, Any] = {}
    for split, items in (("gate_items", gate_items), ("audit", audit)):
        correct = {k: score(items, v, f"{k}-{split}") for k, v in models.items()}
        results[split] = {k: summary(v) for k, v in correct.items()}
        results[split]["p_loop_vs_base"] = mcnemar_one_sided(*discordant(correct["loop"], correct["base"]))
        results[split]["p_loop_vs_sft"] = mcnemar_one_sided(*discordant(correct["loop"], correct["sft_baseline"]))
        results[split]["p_sft_vs_base"] = mcnemar_one_sided(*discordant(correct["sft_baseline"], correct["base"]))
    engine.close()
    times["eval_s"] = time.time() - t
    times["total_s"] = time.time() - t0
    summary_ = {"policy": str(a.policy), "args": {k: str(v) for k, v in vars(a).items()}, "final": current["id"],
                "lineage_steps": lineage, "loop_steps_spent": spent, "sft_baseline_steps": sft["steps"] if sft else None, "train_tasks": len(train_tasks),
                "rounds": per_round, **results, "times_s": {k: round(v, 1) for k, v in times.items()}}
    (out / "learning.json").write_text(json.dumps(summary_, indent=2))
    lines = ["| model | gate items acc [95% CI] | audit acc [95% CI] |", "|---|---|---|"]
    for k in models:
        g, au = results["gate_items"][k], results["audit"][k]
        lines.append(f"| {k} | {cell(g)} | {cell(au)} |")
    (out / "learning.md").write_text("\n".join(lines) + "\n")
    print(json.dumps(summary_, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
