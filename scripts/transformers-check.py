#!/usr/bin/env python3
"""An AWQ checkpoint of ours, loaded by HF transformers (AWQ through GPT-QModel, on the CPU),
scored on the same tokens as `awq eval` scored it: prints both perplexities and their
relative difference, and exits 1 where it exceeds --bound.

Setup (not part of scripts/test.sh: torch is gigabytes):
    python3 -m venv /tmp/hf && /tmp/hf/bin/pip install torch "transformers==5.24.*"
    BUILD_CUDA_EXT=0 /tmp/hf/bin/pip install --no-build-isolation "gptqmodel==7.7.*"
Then, with CTX and WINDOWS as given to `awq eval` (protocol `full`):
    awq eval CKPT --data TEXT --ctx CTX --windows WINDOWS --compute f32 --json ours.json
    /tmp/hf/bin/python scripts/transformers-check.py CKPT TEXT CTX WINDOWS ours.json
"""
import argparse
import json
import math

import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

parser = argparse.ArgumentParser()
parser.add_argument("checkpoint")
parser.add_argument("text")
parser.add_argument("ctx", type=int)
parser.add_argument("windows", type=int)
parser.add_argument("ours", help="the --json report of `awq eval` on the same text")
parser.add_argument("--bound", type=float, default=2e-3)
args = parser.parse_args()

text = open(args.text, encoding="utf-8").read()
ids = Tokenizer.from_file(f"{args.checkpoint}/tokenizer.json").encode(text, add_special_tokens=False).ids
model = AutoModelForCausalLM.from_pretrained(args.checkpoint, device_map="cpu", dtype=torch.float16).eval()
total, count = 0.0, 0
with torch.no_grad():
    for w in range(args.windows):
        x = torch.tensor([ids[w * args.ctx:(w + 1) * args.ctx]])
        logits = model(x).logits.float()[0]
        total += torch.nn.functional.cross_entropy(logits[:-1], x[0, 1:], reduction="sum").item()
        count += x.shape[1] - 1
ppl = math.exp(total / count)
ours = json.load(open(args.ours))["ppl"]
relative = abs(ppl - ours) / ours
kernels = sorted({type(m).__name__ for m in model.modules() if "Awq" in type(m).__name__})
print(f"{args.checkpoint}: transformers {type(model).__name__} ({', '.join(kernels)}) PPL {ppl:.4f} "
      f"over {count} predictions; awq eval {ours:.4f}; relative {relative:.2e}")
raise SystemExit(0 if relative <= args.bound else 1)
