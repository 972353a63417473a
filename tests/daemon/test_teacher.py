"""The daemon with a local teacher, as a real process: a teacher whose tokenizer is not the
student's cannot be distilled from (its token log-probabilities would score other tokens), so
the daemon refuses at start with one line and exit 2, before any round or teacher call."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from daemon_helpers import tiny_policy


def _teacher(tmp_path, model_dir, edit):
    t = tmp_path / "teacher"
    shutil.copytree(model_dir, t)
    edit(t)
    return t


def test_a_teacher_with_another_chat_template_or_vocabulary_is_refused_at_start(tmp_path, tiny_model_dir):
    def template(t):
        p = t / "chat_template.jinja"
        p.write_text(p.read_text().replace("<|im_start|>", "<|start|>"))

    def vocab(t):
        import json

        p = t / "tokenizer.json"
        data = json.loads(p.read_text())
        v = data["model"]["vocab"]
        a, b = sorted(v)[10:12]
        v[a], v[b] = v[b], v[a]  # two tokens swap ids: the same size, other meanings
        p.write_text(json.dumps(data))

    for edit, said in ((template, "their chat templates differ"), (vocab, "their vocabularies differ")):
        shutil.rmtree(tmp_path / "teacher", ignore_errors=True)
        teacher = _teacher(tmp_path, tiny_model_dir, edit)
        policy = tiny_policy(tmp_path, tiny_model_dir, engine="transformers",
                             extra=f'[teacher]\nkind = "transformers"\nmodel = "{teacher}"\n[training]\nalgorithm = "distill"\n')
        proc = subprocess.run([sys.executable, "-m", "selfdistill", "run", str(policy), "--burst"], cwd=tmp_path,
                              env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr[-2000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert said in last and "needs one tokenizer" in last and str(teacher) in last, last
        db = tmp_path / "state" / "selfdistill.db"
        import sqlite3

        assert sqlite3.connect(db).execute("SELECT count(*) FROM rounds").fetchone()[0] == 0
