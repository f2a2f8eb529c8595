#!/usr/bin/env python3
# A GGUF larger than 4 GiB for measuring `awq import-gguf`'s peak memory (a measurement aid,
# not used by any test): SmolLM2-135M's metadata and tokenizer, its tensors dequantized to
# F32, its 30 layers repeated to DEPTH layers. Needs `pip install gguf` (llama.cpp's writer).
#   scripts/deep-gguf.py ~/.cache/awq-pipeline/SmolLM2-135M-Instruct.Q4_1.gguf /tmp/deep.gguf 300  # 4.36 GB
#   /usr/bin/time -f '%M KB peak' awq import-gguf /tmp/deep.gguf --out /tmp/deep --dtype f32
import sys, numpy as np, gguf
src, dst, depth = sys.argv[1], sys.argv[2], int(sys.argv[3])
r = gguf.GGUFReader(src)
arch = "llama"
w = gguf.GGUFWriter(dst, arch, use_temp_file=False)
skip = {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count", "general.architecture"}
for name, field in r.fields.items():
    if name in skip:
        continue
    if name == f"{arch}.block_count":
        w.add_uint32(name, depth); continue
    vtype = field.types[0]
    if vtype == gguf.GGUFValueType.ARRAY:
        sub = field.types[-1]
        if sub == gguf.GGUFValueType.STRING:
            vals = [bytes(field.parts[i]).decode("utf-8", errors="surrogateescape") for i in field.data]
        else:
            vals = [field.parts[i].tolist()[0] for i in field.data]
        w.add_key_value(name, vals, vtype, sub_type=sub)
    elif vtype == gguf.GGUFValueType.STRING:
        w.add_key_value(name, bytes(field.parts[field.data[0]]).decode("utf-8"), vtype)
    else:
        w.add_key_value(name, field.parts[field.data[0]].tolist()[0], vtype)
tensors = {t.name: t for t in r.tensors}
def deq(t):
    a = gguf.quants.dequantize(t.data, t.tensor_type)
    return np.ascontiguousarray(a.reshape([int(x) for x in reversed(t.shape)]).astype(np.float32))
layers = 30
infos = []
for t in r.tensors:
    if not t.name.startswith("blk."):
        infos.append((t.name, t))
for l in range(depth):
    for t in r.tensors:
        if t.name.startswith(f"blk.{l % layers}."):
            infos.append((t.name.replace(f"blk.{l % layers}.", f"blk.{l}.", 1), t))
for name, t in infos:
    shape = [int(x) for x in reversed(t.shape)]
    w.add_tensor_info(name, shape, np.dtype(np.float32), int(np.prod(shape)) * 4, raw_dtype=gguf.GGMLQuantizationType.F32)
w.write_header_to_file(); w.write_kv_data_to_file(); w.write_ti_data_to_file()
cache = {}
for name, t in infos:
    if t.name not in cache:
        if len(cache) > 12: cache.clear()
        cache[t.name] = deq(t)
    w.write_tensor_data(cache[t.name])
w.close()
