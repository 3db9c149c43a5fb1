"""`posttrain models convert FILE.gguf OUT/`: a GGUF file into a Hugging Face checkpoint directory.

    posttrain models convert ~/.cache/posttrain/models/gguf/SmolLM2-135M-Instruct.Q4_1.gguf smollm2/
    posttrain eval smollm2/ --env arithmetic --env-arg digits=1

The body is models/gguf.py's convert_gguf (fp32 safetensors, the tokenizer with the GGUF's chat template, the
generation config, conversion.json); this prints what was written and, for a quantized file, that the weights
are the quantized ones.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console

from posttrain.models.gguf import convert_gguf


def convert(gguf_file: Path, out_dir: Path, *, console: Console) -> dict[str, Any]:
    t0 = time.time()
    record = convert_gguf(gguf_file, out_dir)
    size = sum(f.stat().st_size for f in out_dir.iterdir() if f.is_file()) / 1e6
    console.print(f"wrote {out_dir} in {time.time() - t0:.0f} s ({size:.0f} MB): {record['model_class']}, "
                  f"{record['parameters'] / 1e6:.1f}M parameters, from {gguf_file.name} "
                  f"({record['architecture']}, {record['name'] or 'unnamed'})", markup=False, highlight=False)
    console.print(f"note: {record['note']}", markup=False, highlight=False)
    return record
