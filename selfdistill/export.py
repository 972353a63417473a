"""Exporting a checkpoint for use outside selfdistill.

- `export_adapter(adapter_dir, out_dir)`: a standalone copy of a LoRA adapter with a README and
  a `selfdistill.json` of where it came from; load it with peft on top of its base model, or in
  vLLM with `--enable-lora`.
- `export_merged(base_model_dir, adapter_dir, out_dir)`: the adapter merged into the base
  weights (peft `merge_and_unload`) and saved with its tokenizer as a plain Hugging Face model
  directory, which transformers and vLLM load with no peft at all.

Both write to a `.tmp` sibling and rename it into place, so an interrupted export never leaves a
directory that looks complete (a failed export removes its `.tmp`; the next export to the same
place discards one left by a killed process). An existing `out_dir` is refused, never overwritten.
torch, transformers and peft are imported inside `export_merged` only.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

from selfdistill.checkpoints import ADAPTER_CONFIG, verify_adapter_dir
from selfdistill.errors import ModelError

METADATA = "selfdistill.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@contextlib.contextmanager
def _staged(out_dir: str | os.PathLike[str]) -> Iterator[tuple[Path, Path]]:
    """(out, tmp): build the export in `tmp`; `_finish` renames it to `out`. An export that fails
    removes its `tmp`; one left by a killed process is discarded by the next export to `out`."""
    out = Path(out_dir)
    if out.exists():
        raise ModelError(f"{out}: already exists; export into a new directory (exports never overwrite)")
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield out, tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _finish(tmp: Path, out: Path, kind: str, metadata: dict[str, Any], usage: str) -> Path:
    (tmp / METADATA).write_text(json.dumps({"kind": kind, **metadata}, indent=2, sort_keys=True, default=str) + "\n")
    lines = [f"# {out.name}", "", f"Exported by selfdistill ({kind}).", ""]
    lines += [f"- {k}: {v}" for k, v in sorted(metadata.items()) if not isinstance(v, (dict, list))]
    lines += ["", "Load it with:", "", "```python", usage, "```", ""]
    (tmp / "README.md").write_text("\n".join(lines))
    os.replace(tmp, out)
    return out


def export_adapter(adapter_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], metadata: dict[str, Any] | None = None) -> Path:
    """Copy a checkpoint's adapter into `out_dir` with a README and metadata; return `out_dir`."""
    src = verify_adapter_dir(adapter_dir)
    with _staged(out_dir) as (out, tmp):
        shutil.copytree(src, tmp)
        base = json.loads((src / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
        meta = {"source": str(src.resolve()), "base_model": base, **(metadata or {})}
        usage = (
            "from peft import PeftModel\n"
            "from transformers import AutoModelForCausalLM\n"
            f"model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({str(base)!r}), {str(out)!r})"
        )
        return _finish(tmp, out, "lora-adapter", meta, usage)


def export_merged(
    base_model_dir: str | os.PathLike[str],
    adapter_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    metadata: dict[str, Any] | None = None,
    dtype: str | None = None,
) -> Path:
    """Merge the adapter into the base and save model + tokenizer to `out_dir`; return it.

    The merge runs in the base's dtype; `dtype` ("bfloat16", "float16", "float32") then casts the
    merged weights for saving (the vLLM engine saves its copies in the dtype it serves)."""
    src = verify_adapter_dir(adapter_dir)
    base_dir = Path(base_model_dir)
    if not (base_dir / "config.json").is_file():
        raise ModelError(f"{base_dir}: not a model directory (config.json expected): give the adapter's base model")
    with _staged(out_dir) as (out, tmp):
        from selfdistill.models import offline_env

        offline_env()
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype="auto")
        merged = PeftModel.from_pretrained(model, str(src)).merge_and_unload()
        if dtype not in (None, "auto"):
            import torch

            merged = merged.to(getattr(torch, dtype))
        merged.save_pretrained(str(tmp), safe_serialization=True)
        # A trainer may have saved the tokenizer beside the adapter (e.g. a new chat template);
        # it wins over the base's.
        tok_src = src if any((src / f).is_file() for f in TOKENIZER_FILES) else base_dir
        AutoTokenizer.from_pretrained(str(tok_src)).save_pretrained(str(tmp))
        meta = {"source_adapter": str(src.resolve()), "base_model": str(base_dir.resolve()), **(metadata or {})}
        usage = f"from transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM.from_pretrained({str(out)!r})"
        return _finish(tmp, out, "merged-model", meta, usage)
