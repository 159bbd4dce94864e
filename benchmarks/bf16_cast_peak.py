"""Run on a GPU: python benchmarks/bf16_cast_peak.py. The bf16 stream's cast on the GPU: peak while casting a 128k-vocabulary embedding and head, and exact restore."""
import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
import torch
from qlora_magic.engine.speed import bf16_stream
dev = "cuda"
model = torch.nn.Sequential(torch.nn.Embedding(128256, 4096), torch.nn.Linear(4096, 128256, bias=False)).to(dev)
for p in model.parameters(): p.requires_grad_(False)
before = [p.detach().clone().cpu() for p in model.parameters()]
torch.cuda.synchronize(); base = torch.cuda.memory_allocated(); torch.cuda.reset_peak_memory_stats()
with bf16_stream(model, torch.bfloat16):
    during = torch.cuda.memory_allocated()
    peak_in = torch.cuda.max_memory_allocated()
after = torch.cuda.memory_allocated(); peak = torch.cuda.max_memory_allocated()
print(f"fp32 weights {base/2**30:.2f} GiB; during the run {during/2**30:.2f} GiB; peak entering {peak_in/2**30:.2f} GiB (old in-place cast: {(base + 128256*4096*2)/2**30:.2f}); peak incl. restore {peak/2**30:.2f}; after {after/2**30:.2f}")
print("exact restore:", all(torch.equal(p.cpu(), b) for p, b in zip(model.parameters(), before)))
