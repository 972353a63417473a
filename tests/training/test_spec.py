"""The spec and result round-trip through JSON, and the daemon's side imports nothing heavy."""

import json
import subprocess
import sys

from selfdistill.config import TrainingConfig
from selfdistill.training.spec import RoundSpec, TrainingResult


def test_spec_roundtrip(make_spec, tmp_path):
    spec = make_spec("a", loss_type=["ipo"], reference="base")
    path = spec.write(tmp_path / "spec.json")
    back = RoundSpec.read(path)
    assert back == spec
    assert back.training_config().loss_type == ["ipo"]
    assert isinstance(back.training_config(), TrainingConfig)
    assert json.loads(path.read_text())["output_dir"] == str(spec.output_dir)


def test_result_roundtrip(tmp_path):
    r = TrainingResult(status="skipped", reason="sft skipped: 1 SFT examples < 8 needed", stages={"sft": "skipped: ..."})
    (tmp_path / "r.json").write_text(r.model_dump_json())
    assert TrainingResult.read(tmp_path / "r.json") == r


def test_daemon_side_imports_nothing_heavy():
    code = (
        "import sys, selfdistill.training.child, selfdistill.training.spec, selfdistill.training.guards;"
        "print(sorted(m for m in ('torch','transformers','peft','trl','datasets') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
