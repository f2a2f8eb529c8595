#!/usr/bin/env python3
"""A tiny reference model of `fixtures/tiny/` made with HF transformers: weights from the
project's bit-exact generator (fixtures/README.md), transformers' f32 logits, mean NLL and a
greedy continuation, written as `config.json` (as transformers saves it) and `reference.json`.

    /tmp/hf/bin/python scripts/make-tiny-reference.py NAME TEMPLATE CONFIG_OVERRIDES.json OUT

NAME names the model (it seeds every tensor and the input ids); TEMPLATE is a fixture folder
whose `config.json` and tensor list (names, shapes, kinds, scales) the new model starts from;
the overrides (a JSON object) replace top-level config keys. Made this way:
`tiny-phi3-longrope` (from `tiny-phi3`, see fixtures/README.md).
"""
import hashlib
import json
import sys

import numpy as np
import torch
import transformers

GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def fnv1a64(text):
    h = 0xCBF29CE484222325
    for b in text.encode():
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def splitmix64(seed, n):
    with np.errstate(over="ignore"):
        z = np.uint64(seed) + (np.arange(n, dtype=np.uint64) + np.uint64(1)) * GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def generate(model, tensor):
    n = int(np.prod(tensor["shape"]))
    k = (splitmix64(fnv1a64(f"{model}/{tensor['name']}"), n) >> np.uint64(41)).astype(np.int64) - (1 << 22)
    scale = np.frombuffer(int(tensor["scale_f32_bits"], 16).to_bytes(4, "little"), dtype=np.float32)[0]
    x = k.astype(np.float32) * scale
    if tensor["kind"] == "norm":
        x = np.float32(1.0) + x
    return x.reshape(tensor["shape"])


def main():
    name, template, overrides, out = sys.argv[1:5]
    config = json.load(open(f"{template}/config.json"))
    config.update(json.load(open(overrides)))
    tensors = json.load(open(f"{template}/reference.json"))["tensors"]
    cls = getattr(transformers, config["architectures"][0])
    hf_config = transformers.AutoConfig.for_model(**config)
    hf_config.architectures = config["architectures"]
    model = cls(hf_config).eval()
    state = {}
    listed = []
    for t in tensors:
        w = generate(name, t)
        state[t["name"]] = torch.from_numpy(w.copy())
        listed.append({**t, "sha256_f32_le": hashlib.sha256(w.astype("<f4").tobytes()).hexdigest()})
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and hf_config.tie_word_embeddings)]
    assert not missing and not unexpected, (missing, unexpected)
    vocab = hf_config.vocab_size
    seed = fnv1a64(f"{name}/input_ids")
    ids = (splitmix64(seed, 2 * 96) % np.uint64(vocab)).astype(np.int64).reshape(2, 96)
    with torch.no_grad():
        logits = model(torch.from_numpy(ids)).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, vocab), torch.from_numpy(ids[:, 1:]).reshape(-1), reduction="none"
        ).reshape(2, 95)
        row = torch.from_numpy(ids[0, :32]).unsqueeze(0)
        greedy = []
        for _ in range(24):
            nxt = model(row).logits[0, -1].argmax().item()
            greedy.append(nxt)
            row = torch.cat([row, torch.tensor([[nxt]])], dim=1)
    import os

    os.makedirs(out, exist_ok=True)
    hf_config.save_pretrained(out)
    reference = {
        "architecture": config["architectures"][0],
        "generator": "splitmix64/fnv1a64, see README.md",
        "tensors": listed,
        "input_ids": ids.tolist(),
        "input_ids_rule": "splitmix64 stream of fnv1a64('<model>/input_ids'), value % vocab_size, 2 rows of 96",
        "last4_logits": logits[:, -4:].tolist(),
        "mean_nll_per_sequence": nll.mean(dim=1).double().tolist(),
        "greedy_from_row0_first32": greedy,
        "note": f"transformers {transformers.__version__} f32 CPU (scripts/make-tiny-reference.py); "
        "causal attention over all 96 positions; no BOS added; greedy by full recomputation",
    }
    with open(f"{out}/reference.json", "w") as f:
        json.dump(reference, f)
    print(f"{out}: mean NLL {reference['mean_nll_per_sequence']}, greedy {greedy[:8]}...")


main()
