"""Benchmark: peak resident memory of the driver, during a campaign and during its export.

    .venv/bin/python bench/driver_memory.py        # about 2 minutes on 2 cores

Issue #12: the driver reads config and tokenizer files only; the weights are read by the replicas
(and by the export, one tensor at a time). Each figure is the driver process's own high-water mark
(``VmHWM`` in ``/proc/self/status``; Ray's processes are not counted, and ``ru_maxrss`` is not used
because it would inherit the parent's across ``exec``), measured in a fresh process:

- baseline: the process after importing what a campaign imports (torch, transformers, ray, ...);
- campaign: a SmolLM2-135M BlockPruner campaign of 2 steps (configs/demo.yaml), export off;
- export: ``rayprune export RUN`` of that run (the streamed export, fp32).

The dense model is 513 MiB in fp32 (538,090,408 bytes of safetensors). Section
``<!-- driver_memory -->`` of bench/RESULTS.md.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from results import write_section  # noqa: E402

MARKER = "<!-- driver_memory -->"
DENSE_FP32_BYTES = 538_090_408
IMPORTS = ("import torch, transformers, ray, pyarrow, datasets; import actors.export, actors.stream_export; "
           "import orchestrator.campaign, orchestrator.export, cluster.session")
HWM = "int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) * 1024"


def measure(body: str) -> int:
    """VmHWM in bytes of a fresh Python process that runs the imports, then ``body``."""
    code = f"import re, json; {IMPORTS}\n{body}\nprint(json.dumps({HWM}))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        baseline = measure("")
        campaign = measure(
            "from orchestrator.config_load import load_config\n"
            "from orchestrator.campaign import Campaign\n"
            f"config = load_config({str(ROOT / 'configs' / 'demo.yaml')!r}, ['search.max_steps=2', 'export=false', "
            f"'output={run}'])\n"
            "Campaign(config, progress=False).run()")
        export = measure(f"from orchestrator.export import export_run\nexport_run({str(run)!r})")
    mib = 2**20
    rows = {"baseline (imports only)": baseline, "campaign (2 BlockPruner steps)": campaign,
            "export of the run (fp32, streamed)": export}
    lines = ["## Peak memory of the driver (`bench/driver_memory.py`)", "",
             "| driver process | peak (VmHWM) | above baseline | vs dense fp32 (513 MiB) |", "|---|---:|---:|---:|"]
    for name, value in rows.items():
        above = value - baseline
        lines.append(f"| {name} | {value / mib:,.0f} MiB | {above / mib:+,.0f} MiB | {above / DENSE_FP32_BYTES:.2f}x |")
    lines += ["", "Each in a fresh process on this machine (2 cores), SmolLM2-135M. Above the baseline, the campaign's "
              "driver reads and tokenizes the corpus (the Wikipedia excerpt, through datasets) and runs Ray's driver "
              "and the cache, and reads no weight; the streamed export reads one source tensor at a time and keeps "
              "its reordered copy (the largest here is the 108 MiB embedding), plus the tokenizer it copies. Llama-2-70B in bf16: the "
              "driver of a campaign holds no weight; its export holds at most a 448 MiB gate_proj and its copy, or "
              "the 500 MiB embedding, so under 1 GiB above the baseline, against 128 GiB for the dense model."]
    write_section(MARKER, lines)
    print(json.dumps({k: round(v / mib) for k, v in rows.items()}))


if __name__ == "__main__":
    main()
