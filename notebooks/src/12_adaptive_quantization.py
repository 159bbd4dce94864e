# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Adaptive quantization: `--bits auto`
#
# Slide 14 of the course lists *adaptive quantization* among QLoRA's future directions: not every layer suffers
# equally from 4-bit weights, so spend the bits where they matter. `%qlora_load --bits auto` does this:
#
# 1. **measure**: the unquantized model reads a few calibration texts (rows of the shipped `word_forms` data in
#    the chat template) while hooks sample each linear layer's inputs X; for each layer, the relative output
#    error of its weight W after a quantization round trip, ‖X(Q(W) − W)ᵀ‖ / ‖XWᵀ‖, for **NF4** (as `--bits 4`
#    stores it) and for **LLM.int8** (as `--bits 8` does);
# 2. **choose**: rank the layers by the error 4-bit adds over 8-bit *per parameter* and keep the top ones in
#    8-bit, up to `--keep-8bit` (default 0.25) of the quantized parameters;
# 3. **report**: the same model, its weights swapped for their round trips, scores ten *other* calibration texts
#    as uniform 8-bit, the mix and uniform 4-bit: footprint and perplexity of each against 16 bits;
# 4. **build**: NF4 for the rest, bitsandbytes `Linear8bitLt` for the chosen layers, LoRA on both.

# %%
# %load_ext qlora_magic
import qlora_magic as qm

DATA = qm.examples.path("word_forms")   # 100 rows: opposites, plurals, past tenses
PROMPT = "Instruction: {instruction}\n\nInput: {context}\n\nResponse: "

# %%
# %qlora_load --bits auto

# %% [markdown]
# The readout's indented rows are the comparison: **uniform 8-bit / auto / uniform 4-bit**, each with its weight
# footprint and the calibration perplexity next to the 16-bit model's. In numbers:

# %%
adaptive = qm.get_session().last_load_report.adaptive
ppl = {kind: adaptive.perplexity(kind) for kind in ("16-bit", "8-bit", "auto", "4-bit")}
mb = {kind: size / 1e6 for kind, size in adaptive.footprints.items()}
kept = (ppl["4-bit"] - ppl["auto"]) / (ppl["4-bit"] - ppl["8-bit"])
print(f"memory saved vs uniform 8-bit: {mb['8-bit'] - mb['auto']:.1f} MB "
      f"({1 - mb['auto'] / mb['8-bit']:.0%}); uniform 4-bit would save {mb['8-bit'] - mb['4-bit']:.1f} MB")
print(f"perplexity: 16-bit {ppl['16-bit']:.2f}, 8-bit {ppl['8-bit']:.2f}, auto {ppl['auto']:.2f}, 4-bit {ppl['4-bit']:.2f}")
print(f"auto closes {kept:.0%} of the perplexity gap between uniform 4-bit and uniform 8-bit")

# %% [markdown]
# ## Which layers are sensitive
#
# Every quantizable layer, most sensitive (per parameter) first. The `8-bit` column is the choice:

# %%
adaptive.to_dataframe(top=12)

# %%
import matplotlib.pyplot as plt
import pandas as pd
from qlora_magic.engine.adaptive import short_name

table = adaptive.to_dataframe()
table["kind"] = table["layer"].str.rsplit(".", n=1).str[-1]
top = table.head(20)
fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.4))
left.bar(top["layer"].map(short_name), top["error_4bit"], color=["C3" if k else "C0" for k in top["8-bit"]], label="NF4")
left.bar(top["layer"].map(short_name), top["error_8bit"], color="k", label="int8")
left.set_title("top 20 layers: relative output error (red: kept 8-bit)")
left.tick_params(axis="x", rotation=90, labelsize=7)
left.legend()
by_kind = table.groupby("kind")[["error_4bit", "error_8bit"]].mean().sort_values("error_4bit")
by_kind.plot.barh(ax=right, title="mean error by projection")
plt.tight_layout()
plt.show()

# %%
table.groupby("kind")["8-bit"].agg(["sum", "count"]).rename(columns={"sum": "kept 8-bit", "count": "layers"})

# %% [markdown]
# The value projections stand out: NF4 costs them the most output error, and they are small, so keeping them
# in 8-bit buys much quality per byte; the small k projections follow for the same reason. At the default budget
# all attention projections stay 8-bit and all MLP projections go 4-bit. Ranking by the *plain* excess error instead (which
# favours the large MLP layers) kept less quality for the same footprint in our measurement (docs/user-guide.md).
#
# `--keep-8bit` moves along the curve between uniform 4-bit (0) and uniform 8-bit (1). The choice for other
# budgets, from the same measurement:

# %%
from qlora_magic.engine.adaptive import choose_layers_8bit

for fraction in (0.05, 0.1, 0.25, 0.5):
    print(f"--keep-8bit {fraction}: {len(choose_layers_8bit(adaptive.layers, fraction))} layers in 8-bit")

# %% [markdown]
# ## Fine-tune on the mix
#
# Training works as on any quantized model. LoRA goes on `q_proj` and `v_proj` as usual, whichever kind each
# layer is (the table above says which are 8-bit); bitsandbytes and PEFT handle both kinds in one model.

# %%
# %%qlora_train --max-steps 10 --lr 1e-3 --batch-size 4 --grad-accum 1 --display text
data: $DATA
prompt: "Instruction: {instruction}\n\nInput: {context}\n\nResponse: "
response: '{response}'

# %%
print(qm.generate(PROMPT.format(instruction="Give the opposite of the word.", context="early"),
                  raw=True, greedy=True, max_new_tokens=16, stream=False))

# %% [markdown]
# ## Save and restore the same mix
#
# The saved adapter's `qlora_magic.json` records which layers were 8-bit, so `--adapter` rebuilds the same mix
# without measuring again (no comparison rows in the readout this time):

# %%
# %qlora_save runs/adaptive-word-forms
# %qlora_load --adapter runs/adaptive-word-forms

# %% [markdown]
# `--keep-8bit` chooses layers for `--bits auto` only; elsewhere it is a one-line error:

# %% tags=["raises-exception"]
# %qlora_load --bits 4 --keep-8bit 0.3
