"""The GGUF export checked on the embedded model: SmolLM2-135M-Instruct with a random 4-head adapter (q, k, v,
o; seed 1), merged and written as GGUF in each type given, read back by transformers' own GGUF loader; prints
the export time, the file size and the largest logit difference to the merged model on a chat prompt.

    python bench/gguf_check.py f32 f16 q8_0 [--out DIR]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from p2d.adapter import HeadAdapter, merged_weights  # noqa: E402
from p2d.gguf_export import GGUF_TYPES, export_gguf, gguf_name  # noqa: E402
from p2d.models import load_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("types", nargs="+", choices=GGUF_TYPES)
    ap.add_argument("--out", default="runs/gguf_check", help="scratch folder (emptied first)")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    lm = load_model("default", device="cpu")
    adapter = HeadAdapter(lm.geometry, [[3, 0], [10, 4], [20, 8], [29, 2]], ("q", "k", "v", "o"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    adapter_dir = adapter.save(out / "adapter", base_model="default")
    text = lm.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                            add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([lm.tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        base = lm.model(ids).logits
        with merged_weights(lm, adapter_dir):
            merged = lm.model(ids).logits
    print(f"{ids.shape[1]} prompt tokens; the adapter moves the logits by up to {(merged - base).abs().max():.2f} "
          f"(largest |logit| {merged.abs().max():.1f})", flush=True)
    for outtype in args.types:
        start = time.time()
        folder = export_gguf(lm, adapter_dir, out / outtype, outtype)
        took = time.time() - start
        back = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf_name(outtype), dtype=torch.float32)
        with torch.no_grad():
            got = back(ids).logits
        size = (folder / gguf_name(outtype)).stat().st_size / 2 ** 20
        print(f"{outtype}: export {took:.1f} s, {size:.0f} MiB, largest |logit difference| "
              f"{(got - merged).abs().max():.2e}, same top token at every position: "
              f"{bool((got.argmax(-1) == merged.argmax(-1)).all())}", flush=True)


if __name__ == "__main__":
    main()
