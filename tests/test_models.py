"""Local models: the bundled student converted from its GGUF, and the tiny model builder."""

from __future__ import annotations

import json
import time

from sd_testutil import run_cli

from selfdistill.models import BUNDLED_DIRNAME, build_tiny_model, is_model_dir, prepare_bundled, resolve_base_model


def test_bundled_student_is_prepared_once_and_speaks(bundled_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert bundled_model_dir.name == BUNDLED_DIRNAME and is_model_dir(bundled_model_dir)
    t = time.time()
    assert prepare_bundled() == bundled_model_dir  # no-op when prepared
    assert time.time() - t < 1.0
    tok = AutoTokenizer.from_pretrained(bundled_model_dir)
    assert tok.chat_template and tok.pad_token is not None
    model = AutoModelForCausalLM.from_pretrained(bundled_model_dir, dtype=torch.float32)
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=24, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in text, text


def test_models_prepare_cli_is_a_noop_when_prepared(bundled_model_dir):
    r = run_cli("models", "prepare", env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0 and str(bundled_model_dir) in r.stdout


def test_tiny_model_builds_fast_with_chat_template(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t = time.time()
    out = build_tiny_model(tmp_path / "tiny", seed=1)
    assert time.time() - t < 10
    tok = AutoTokenizer.from_pretrained(out)
    text = tok.apply_chat_template([{"role": "user", "content": "abc 12"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nabc 12<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text  # character-level, lossless
    model = AutoModelForCausalLM.from_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["hidden_size"] // cfg["num_attention_heads"] == 32  # vLLM's CPU attention needs >= 32
    assert model.generate(**tok(text, return_tensors="pt"), max_new_tokens=4, do_sample=False).shape[1] == len(ids) + 4


def test_resolve_base_model_errors(tmp_path):
    import pytest

    from selfdistill.errors import ModelError

    with pytest.raises(ModelError, match="does not exist"):
        resolve_base_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="not a model directory"):
        resolve_base_model(str(tmp_path / "empty"))


def test_a_model_the_service_user_cannot_read_is_one_line(tiny_model_dir):
    """The weights save_pretrained writes are owner-only: a service user given root's copy got
    "unexpected FileNotFoundError" from deep in the loader (found by the systemd unit test)."""
    import os
    import shutil
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    import pytest

    if os.geteuid() != 0:
        pytest.skip("needs root to hand a root-owned model to another user")
    top = Path(tempfile.mkdtemp(dir="/var/tmp"))  # pytest's temp tree is root's alone: nobody could reach any of it
    model = top / "model"
    shutil.copytree(tiny_model_dir, model)
    model.chmod(0o755)
    code = ("import os, sys\nfrom selfdistill.models import check_model_dir\n"  # this python lives under /root: import first
            f"os.setgid(65534); os.setuid(65534); check_model_dir({str(model)!r})")

    def as_nobody() -> str:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        return "ok" if r.returncode == 0 else r.stderr

    try:
        top.chmod(0o700)
        assert f"{model}: the model directory cannot be reached by uid 65534" in as_nobody()
        top.chmod(0o755)
        (model / "model.safetensors").chmod(0o600)
        assert f"{model}: model.safetensors cannot be read by uid 65534; make the model directory readable" in as_nobody()
        (model / "model.safetensors").chmod(0o644)
        assert as_nobody() == "ok"
    finally:
        shutil.rmtree(top)
