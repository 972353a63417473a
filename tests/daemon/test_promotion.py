"""Gates, promotion and rollback end to end on the tiny model, through the daemon's own phases.

A candidate trained (by the real training child) to answer a toy task is evaluated against the
incumbent on the same held-out items, promoted and served; a deliberately damaged candidate is
rejected; rollback restores the previous checkpoint; and a crash between the promotion's store
transaction and the pointer switch is repaired when the daemon starts again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from selfdistill.checkpoints import checkpoint_path, read_current, switch_current
from selfdistill.config import load_policy
from selfdistill.cycle import Cycle, RunState
from selfdistill.engines.base import SamplingParams
from selfdistill.operations import open_state, rollback
from selfdistill.records import chat_messages

pytestmark = pytest.mark.slow


def _policy(tmp: Path, model: Path) -> Path:
    tasks = tmp / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"prompt": f"Item {i}: say seven.", "answer": "7"}) + "\n" for i in range(80)))
    p = tmp / "p.toml"
    p.write_text(f"""
state_dir = "state"
[student]
base_model = "{model}"
lora = {{ r = 8, alpha = 16 }}
[engine]
kind = "transformers"
dtype = "float32"
max_model_len = 256
[tasks]
heldout_fraction = 0.4
default_verifier = "exact"
[[tasks.sources]]
type = "jsonl"
path = "{tasks}"
[training]
algorithm = "sft"
learning_rate = 0.005
epochs = 12
batch_size = 8
max_length = 64
min_sft_examples = 1
threads = 1
min_loss_change = 0.0
[evaluation]
heldout_items = 20
max_tokens = 4
anchor_prompts = ["hello there", "the cat sat"]
anchor_max_tokens = 8
[gates]
test = "mcnemar"
alpha = 0.05
min_gain = 0.1
max_anchor_nll_increase = 50.0
max_length_ratio = 1000.0
max_empty_fraction = 1.0
""")
    return p


def _train_candidate(cyc: Cycle, rid: int, completion: str, epochs: int) -> str:
    """Run the real training child on a hand-made data file; register the candidate in the round."""
    from selfdistill.checkpoints import new_checkpoint_dir
    from selfdistill.training.child import run_training_child
    from selfdistill.training.spec import RoundSpec

    st = cyc.store
    ckpt = st.next_checkpoint_id()
    work = cyc.state_dir / "tmp" / f"manual-{rid}"
    work.mkdir(parents=True)
    data = work / "data.jsonl"
    data.write_text("".join(json.dumps({"kind": "sft", "prompt": t.prompt, "completion": completion, "weight": 1.0}) + "\n"
                            for t in st.tasks(split="train")))
    tr = cyc.policy.training.model_dump(mode="json") | {"epochs": epochs}
    inc = st.get_round(rid)["incumbent_id"]
    spec = RoundSpec(round_id=rid, base_model_dir=cyc.model_dir,
                     incumbent_adapter_dir=st.checkpoint(inc)["path"] if inc != "base" else None,
                     output_dir=new_checkpoint_dir(cyc.state_dir, ckpt), data_path=data, training=tr,
                     lora=cyc.policy.student.lora.model_dump(mode="json"), result_path=work / "result.json", threads=1,
                     hf_home=cyc.state_dir / "cache" / "hf")
    res = run_training_child(spec, time_limit_s=600)
    assert res.status == "succeeded", res.reason
    st.add_checkpoint(ckpt, inc, rid, str(spec.output_dir), {"manual": True})
    st.update_round(rid, candidate_id=ckpt, phase="evaluate")
    return ckpt


def _damage(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    f = path / "adapter_model.safetensors"
    w = load_file(str(f))
    save_file({k: v * 0 + 3.0 for k, v in w.items()}, str(f))  # huge, uniform LoRA weights


def test_promote_serve_reject_rollback_and_repair(tmp_path, tiny_model_dir):
    policy = load_policy(_policy(tmp_path, tiny_model_dir))
    store = open_state(policy)
    from selfdistill.operations import ingest_tasks

    ingest_tasks(policy, store)
    cyc = Cycle(policy, store, RunState())

    # 1. a candidate trained to answer "7" beats the base (which answers junk) and is promoted
    rid = store.create_round("base")
    good = _train_candidate(cyc, rid, "7", epochs=12)
    rnd = cyc.run_round()
    assert rnd["decision"] == "promote", rnd["reasons"]
    assert store.current_checkpoint()["id"] == good and read_current(policy.state_dir) == good
    assert rnd["metrics"]["candidate_accuracy"] >= 0.9 and rnd["metrics"]["incumbent_accuracy"] <= 0.1
    assert rnd["metrics"]["p_value"] < 0.05
    # ... and served: the engine answers with the promoted adapter
    out = cyc.engine.generate([chat_messages("Item 3: say seven.")], SamplingParams(temperature=0, max_tokens=2),
                              adapter=cyc.serving.adapter_for(cyc.current_id()))
    assert out[0][0].text.strip().startswith("7")  # the base answers whitespace here

    # 2. a deliberately damaged candidate is rejected with its reasons; the incumbent stays
    rid2 = store.create_round(good)
    bad = _train_candidate(cyc, rid2, "7", epochs=1)
    _damage(checkpoint_path(policy.state_dir, bad))
    rnd2 = cyc.run_round()
    assert rnd2["decision"] == "reject"
    assert any("anchor" in r or "accuracy gain" in r for r in rnd2["reasons"]), rnd2["reasons"]
    assert store.checkpoint(bad)["status"] == "rejected"
    assert store.current_checkpoint()["id"] == good and read_current(policy.state_dir) == good
    cyc.close()

    # 3. rollback returns to the base (the previous promoted checkpoint), the same way
    assert rollback(policy, None, "test") == "base"
    assert store.current_checkpoint()["id"] == "base" and read_current(policy.state_dir) == "base"

    # 4. a promotion that crashed after its store transaction, before the pointer switch
    store.commit_promotion(good, "crash test")
    switch_current(policy.state_dir, "base")  # the pointer was left behind
    store.close()
    (policy.state_dir / "STOP").write_text("")  # start, recover, stop at once
    r = subprocess.run([sys.executable, "-m", "selfdistill", "run", str(tmp_path / "p.toml")], capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert r.returncode == 10, r.stderr[-2000:]
    assert "current pointer repaired" in r.stderr
    assert read_current(policy.state_dir) == good
