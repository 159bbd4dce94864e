"""Writes (and with --execute, runs in place) the course notebooks 08_evaluation, 09_adapters_and_merge, 10_tuning,
11_classification_and_summarization, 12_adaptive_quantization.

    python scripts/make_eval_notebooks.py --execute [08|09|10|11|12]

Same layout as scripts/make_course.py: each notebook is a list of ("md" | "code", source) cells.
Each runs top to bottom on a CPU with the embedded default model (SmolLM2-135M) in a few minutes.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SETUP = """%load_ext qlora_magic
import qlora_magic as qm

DATA = qm.examples.path("word_forms")   # 100 rows: opposites, plurals, past tenses
PROMPT = "Instruction: {instruction}\\n\\nInput: {context}\\n\\nResponse: \""""

EVALUATION = [
    ("md", """# Evaluating a QLoRA adapter

Slide 9 of the course computes a "perplexity" from the cross-entropy of *all* logits (prompt tokens
included) and a BLEU score on the argmax of teacher-forced logits, which is not what the model would say.
`%qlora_eval` measures what matters instead:

* **perplexity** = exp(mean negative log-likelihood of the *response* tokens), the loss training minimizes,
  summed over every response token of the data set, with the prompt masked out;
* **BLEU** (sacrebleu), **ROUGE-1/2/L** (rouge-score) and **exact match** of the model's own greedy answers
  against the references;
* the **base model** (adapters disabled, no second copy in memory) and the adapter **in one table**.

By default it evaluates on the held-out split of the last training run, rebuilt exactly as training built it."""),
    ("code", SETUP),
    ("code", "%qlora_load"),
    ("md", "A short run on the shipped `word_forms` data, holding out 20% of the rows for evaluation:"),
    ("code", """%%qlora_train --max-steps 15 --lr 1e-3 --batch-size 4 --grad-accum 1 --display text
data: $DATA
prompt: "Instruction: {instruction}\\n\\nInput: {context}\\n\\nResponse: "
response: "{response}"
eval_split: 0.2"""),
    ("md", """## Base vs adapter on the held-out rows

`--base` adds the model with its adapters switched off, so the same table shows *before* (base) and
*after* (adapter). Greedy answers are kept for inspection below the table."""),
    ("code", "%qlora_eval --base --metrics perplexity,bleu,rouge,exact_match --max-new-tokens 24"),
    ("md", """Every evaluation also lands in the session history as rows of kind `eval` (kept apart from the training
rows, so loss charts are unaffected), next to the Trainer's own `eval_loss`. The adapter's `response_loss`
is the same masked loss on the same rows, but weighted by token over the whole split; the Trainer averages
the means of its batches, so short and long batches count alike and the two differ slightly."""),
    ("code", """import pandas as pd

history = qm.get_session().history
print("Trainer's last eval_loss:", [r["eval_loss"] for r in history if "eval_loss" in r][-1])
pd.DataFrame([r for r in history if r.get("kind") == "eval"]).drop(columns=["kind"])"""),
    ("md", """## Any data set, from Python

The Python API takes the same options. Here: words the training data never contained."""),
    ("code", """new_words = [
    {"instruction": "Give the opposite of the word.", "context": "wet", "response": 'The opposite of "wet" is "dry".'},
    {"instruction": "Give the plural of the word.", "context": "box", "response": 'The plural of "box" is "boxes".'},
    {"instruction": "Give the past tense of the verb.", "context": "jump", "response": 'The past tense of "jump" is "jumped".'},
    {"instruction": "Give the opposite of the word.", "context": "young", "response": 'The opposite of "young" is "old".'},
]
report = qm.evaluate(new_words, prompt=PROMPT, response="{response}", base=True,
                     metrics=["perplexity", "exact_match"], max_new_tokens=24)
report"""),
    ("code", "report.to_dataframe()"),
    ("md", """## Side by side: `%qlora_compare`

The same prompts answered by the base model and by each adapter, greedy by default, from one model in
memory. `--raw` sends the prompt exactly as written, which matches the plain prompt template used in
training (the cell body separates prompts with lines of `---`; here the Python form builds them from the
template, so the trailing space after `Response:` is exact)."""),
    ("code", """prompts = [PROMPT.format(**row) for row in new_words]
qm.compare(prompts, raw=True, max_new_tokens=24)"""),
    ("md", """Without `--raw` the prompt goes through the model's chat template, as a user would ask it. A quick check
that general knowledge survived the fine-tuning:"""),
    ("code", """%%qlora_compare --max-new-tokens 20
What is the capital of France?
---
Write a haiku about autumn."""),
    ("md", """Bad inputs fail with one line that says what to do:"""),
    ("error", "%qlora_eval --metrics accuracy"),
]

ADAPTERS = [
    ("md", """# Several adapters on one quantized base, and merging

Slide 14's multi-task idea with PEFT's named adapters: one 8-bit base in memory, one small LoRA adapter
per task. `%qlora_adapters` adds, loads, lists, switches, combines and deletes them; the **active** adapter
is the one `%qlora_generate`, `%qlora_eval` and `%%qlora_train` use, and only it is trained.
`%qlora_merge` then folds an adapter into an unquantized 16-bit copy of the base and checks the result."""),
    ("code", SETUP + """

import json

rows = [json.loads(line) for line in open(DATA)]
opposites = [r for r in rows if "opposite" in r["instruction"]]
past_tenses = [r for r in rows if "past tense" in r["instruction"]]
# The last 6 rows of each task are kept out of training, to evaluate on.
opposites, opposites_test = opposites[:-6], opposites[-6:]
past_tenses, past_test = past_tenses[:-6], past_tenses[-6:]
len(opposites), len(past_tenses)"""),
    ("code", "%qlora_load"),
    ("md", "The first adapter (`default`) learns opposites:"),
    ("code", """%%qlora_train --max-steps 10 --lr 2e-3 --batch-size 4 --grad-accum 1 --display text
data: $opposites
prompt: "Instruction: {instruction}\\n\\nInput: {context}\\n\\nResponse: "
response: "{response}"
"""),
    ("md", "A second adapter beside it, on the same quantized base, learns past tenses. It becomes the active one:"),
    ("code", "%qlora_adapters add past --r 8"),
    ("code", """%%qlora_train --max-steps 10 --lr 2e-3 --batch-size 4 --grad-accum 1 --display text
data: $past_tenses
prompt: "Instruction: {instruction}\\n\\nInput: {context}\\n\\nResponse: "
response: "{response}"
"""),
    ("md", """The same prompts through the base and each adapter, one model in memory. Two answers say little (the base
already knows some past tenses, and each adapter answers in the `The ... of "x" is "y".` format it learned);
the perplexities below measure the specialization:"""),
    ("code", """probe = [
    {"instruction": "Give the opposite of the word.", "context": "wet"},
    {"instruction": "Give the past tense of the verb.", "context": "jump"},
]
qm.compare([PROMPT.format(**r) for r in probe], raw=True, max_new_tokens=20)"""),
    ("md", """Perplexity of each adapter on the held-back rows of each task (the base for reference). `adapters=`
(`--adapters` in the magic) evaluates several in one table:"""),
    ("code", """for name, task in (("opposites", opposites_test), ("past tenses", past_test)):
    print(name)
    display(qm.evaluate(task, prompt=PROMPT, response="{response}", adapters=["default", "past"], base=True))"""),
    ("md", """A weighted combination (PEFT `add_weighted_adapter`; ranks agree here, so `linear`), then switching back
and deleting it:"""),
    ("code", "%qlora_adapters combine both --weights default=1.0,past=1.0"),
    ("code", "qm.compare([PROMPT.format(**r) for r in probe], raw=True, max_new_tokens=20, base=False)"),
    ("code", """%qlora_adapters delete both
%qlora_adapters switch past"""),
    ("md", "A name that does not exist is a one-line error:"),
    ("error", "%qlora_adapters switch opposites"),
    ("md", """## Merge and export

`%qlora_merge` reloads the base from its original weights in 16 bits (merging into 8- or 4-bit weights would
round the update back onto the quantization grid), copies the active adapter in, merges, saves safetensors,
reloads what it saved and compares its greedy answers and perplexity with the adapter's. With no held-out
split in the last run, `data=` names the rows to check on (the last run's templates apply)."""),
    ("code", """import shutil
shutil.rmtree("runs/merged/past-tense", ignore_errors=True)
report = qm.merge("runs/merged/past-tense", data=past_test)   # %qlora_merge runs/merged/past-tense checks on held-out rows
report"""),
    ("md", """The check compares two different models on purpose: the adapter *as trained*, on the 8-bit base, and the
merged model, on the original 16-bit weights, which is what you ship. Perplexity moves by about a percent,
usually down, since the original weights are the better ones. A greedy answer can flip where the model's two
best next words were close (an odd verb for a 10-step adapter, say), and then the check says so instead of
passing: read the `differs` rows. The merge itself adds nothing: on a 16-bit base (`--bits 16`) the merged
model's logits equal the adapter's up to float rounding (`tests/test_merging.py`)."""),
    ("md", "The merged folder is a plain transformers model: no peft, no bitsandbytes."),
    ("code", """from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("runs/merged/past-tense")
merged = AutoModelForCausalLM.from_pretrained("runs/merged/past-tense")
inputs = tokenizer(PROMPT.format(**probe[1]), return_tensors="pt")
out = merged.generate(**inputs, max_new_tokens=16, do_sample=False)
print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))"""),
]

TUNING = [
    ("md", """# Hyperparameter search with `%%qlora_tune`

Slide 10 wraps `Trainer` in an Optuna objective that calls `get_peft_model(base_model, ...)` again for each
trial, on a base that already carries the previous trial's adapter. Here each trial adds a **fresh adapter**
on the same quantized base (a new LoRA update starts at zero, so every trial starts from the same weights),
trains it, and is scored by its **held-out eval loss**. Trials trailing the median of earlier ones at the same
step are **pruned** (stopped early). Finished trials' adapters are deleted, except the best, which stays
active. Memory is measured after every trial, and the five trials below show it does not grow."""),
    ("code", SETUP),
    ("code", "%qlora_load"),
    ("code", """%%qlora_tune --trials 5
data: $DATA
prompt: "Instruction: {instruction}\\n\\nInput: {context}\\n\\nResponse: "
response: "{response}"
eval_split: 12
max_steps: 6
eval_steps: 3
batch_size: 4
grad_accum: 1
search:
  r: [4, 8, 16]
  lr: {low: 3.0e-4, high: 3.0e-3, log: true}"""),
    ("md", """## Memory from trial to trial

Two measures after each trial: the process's resident memory (RSS; on a GPU, allocated memory), and the live
tensors besides the adapters still loaded, i.e. the quantized base plus anything a finished trial left behind.
A trial that leaked would keep at least its adapter and Adam's two states of it: about 2.8 MB at `r: 4`, 11 MB at
`r: 16`. So the check below allows 1 MB of tensor growth from the first trial to the last. RSS is the coarser
measure: the C allocator's arenas and Python-side caches move it by tens of MB either way (+33 and +58 MB in two
runs of this notebook, with the tensors unchanged), so it is held only below a kept copy of the 221 MB model."""),
    ("code", """import pandas as pd

report = qm.get_session().last_tune_report
rss_growth, tensor_growth = report.memory_growth() / 2**20, report.memory_growth("other_tensors") / 2**20
print(f"after trial 0 -> trial {len(report.trials) - 1}: RSS {rss_growth:+.1f} MB, other tensors {tensor_growth:+.3f} MB")
assert tensor_growth <= 1 and rss_growth < 200, "memory grew from trial to trial"
pd.DataFrame([{"trial": t["trial"], "state": t["state"], "RSS (MB)": round(t["memory"] / 2**20, 1),
               "other tensors (MB)": round(t["other_tensors"] / 2**20, 3)} for t in report.trials]).set_index("trial")"""),
    ("md", """The best trial's settings are kept for a longer run (`best_train_config` is a ready `TrainConfig`; the LoRA
part goes to `%qlora_adapters add` or `%qlora_load`), and its adapter is already the active one:"""),
    ("code", """print("best:", report.best_params)
qm.list_adapters()"""),
    ("code", "%qlora_eval --base"),
    ("md", "An empty or malformed search space is a one-line error:"),
    ("error", """%%qlora_tune
data: $DATA
prompt: "{instruction}"
response: "{response}"
eval_split: 0.2"""),
]

TASKS = [
    ("md", """# Classification and summarization: `--task seq-cls` and `--task seq2seq`

Slides 11 and 12 take QLoRA beyond answering prompts: sentiment classification (IMDB with DeBERTa-v3) and
summarization (CNN/DailyMail with BART). Here both run offline on a CPU in about a minute:

* **classification** on the embedded default model (SmolLM2-135M) with a new 2-class head, on short reviews
  made up below. With a Hub connection, use `microsoft/deberta-v3-base` on `imdb` (see `docs/tasks.md`);
* **summarization** on a tiny T5 built from a config (random weights: it shows the mechanics, not quality).
  With a Hub connection, use `google/flan-t5-base` or `facebook/bart-base` on `cnn_dailymail`."""),
    ("code", """%load_ext qlora_magic
import itertools
import qlora_magic as qm

GOOD = ["wonderful", "brilliant", "moving", "delightful", "superb", "charming"]
BAD = ["dull", "awful", "boring", "clumsy", "tedious", "dreadful"]
THINGS = ["acting", "plot", "film", "ending", "script", "music"]
REVIEWS = [{"text": f"The {thing} was {word}.", "sentiment": label}
           for thing, (word, label) in itertools.product(THINGS, [(w, "positive") for w in GOOD] + [(w, "negative") for w in BAD])]
len(REVIEWS), REVIEWS[0]"""),
    ("md", """## Sentiment classification

`--task seq-cls` loads `AutoModelForSequenceClassification`: the quantized decoder plus a new `score` head of
`--num-labels` outputs (default 2). LoRA goes on `q_proj`/`v_proj` as usual, and PEFT's `SEQ_CLS` task type
keeps the head trainable (`modules_to_save`), so it is saved with the adapter."""),
    ("code", "%qlora_load --task seq-cls --num-labels 2"),
    ("md", """The body names the text template (`prompt:`) and the label column (`label:`). String labels get ids in
sorted order (`negative` = 0, `positive` = 1). With `eval_split`, every evaluation reports accuracy and macro F1
on the held-out rows: here 18 reviews whose word and subject pairs were never seen in training."""),
    ("code", """%%qlora_train --max-steps 20 --lr 1e-3 --batch-size 4 --grad-accum 1 --display text
data: $REVIEWS
prompt: "{text}"
label: sentiment
eval_split: 0.25"""),
    ("md", "`qm.classify` gives each text's label and every class's probability, here on words not in the data:"),
    ("code", """qm.classify(["The soundtrack was fantastic.", "The story was painfully slow.", "A masterpiece of a film."])"""),
    ("md", "A classifier does not generate text; `%qlora_generate` says what to use instead, in one line:"),
    ("error", "%qlora_generate The film was"),
    ("md", """### Merging the classifier

`%qlora_merge` reloads the base unquantized as `AutoModelForSequenceClassification` with the class names training
learned, copies in the LoRA weights and the trained `score` head, merges and saves. The check predicts every
held-out review with the adapter (on the 8-bit base) and with the saved model (on the original weights): the
labels must agree, and the logits may move a little."""),
    ("code", """import shutil
shutil.rmtree("runs/merged/sentiment", ignore_errors=True)
%qlora_merge runs/merged/sentiment"""),
    ("md", "The merged folder is a plain transformers classifier (no peft, no bitsandbytes) that knows its labels:"),
    ("code", """from transformers import AutoModelForSequenceClassification, AutoTokenizer

classifier = AutoModelForSequenceClassification.from_pretrained("runs/merged/sentiment")
merged_tokenizer = AutoTokenizer.from_pretrained("runs/merged/sentiment")
batch = merged_tokenizer(["The soundtrack was fantastic.", "The story was painfully slow."], return_tensors="pt", padding=True)
print(classifier.config.id2label, [classifier.config.id2label[i] for i in classifier(**batch).logits.argmax(-1).tolist()])
del classifier"""),
    ("md", """What the check measures is the distance between the adapter *as trained*, on 8-bit weights, and the merged
model on the original 16-bit ones. The labels and the accuracy agree; the class probabilities move by a few
hundredths on average (the check's `--tolerance 0.05` is on that mean), more on a row near the decision
boundary. That drift comes from the quantization, not from the merge: `tests/test_merging.py` and a 16-bit load
(`--bits 16`) give logits equal to the adapter's within about 1e-6 in float32."""),
    ("md", """## Summarization with an encoder-decoder

`--task seq2seq` loads `AutoModelForSeq2SeqLM`. Offline there is no pretrained one, so we build a 2-layer T5
with random weights around the default model's tokenizer. An encoder-decoder needs `--task seq2seq`, and a
decoder-only model cannot take it:"""),
    ("error", "%qlora_load --task seq2seq"),
    ("code", """from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration
from qlora_magic.default_model import default_model_path
import torch

tokenizer = AutoTokenizer.from_pretrained(default_model_path())
tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
config = T5Config(vocab_size=len(tokenizer), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                  decoder_start_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
torch.manual_seed(0)
T5ForConditionalGeneration(config).save_pretrained("runs/tiny-t5")
tokenizer.save_pretrained("runs/tiny-t5")"""),
    ("md", """Without `--targets`, PEFT's table for T5 puts LoRA on `q` and `v`; a random model needs more, so all linear
layers here. `prompt:` is the source and `response:` the target: the loss is on the target tokens only."""),
    ("code", "%qlora_load runs/tiny-t5 --task seq2seq --targets all-linear"),
    ("code", """SUMMARIES = [{"article": r["text"].replace("The ", "Critics agreed that the "), "summary": r["sentiment"]} for r in REVIEWS]
SUMMARIES[0]"""),
    ("code", """%%qlora_train --max-steps 30 --lr 2e-2 --batch-size 4 --grad-accum 1 --display text
data: $SUMMARIES
prompt: "summarize: {article}"
response: "{summary}"
eval_split: 0.25"""),
    ("md", """`%qlora_eval` works as for causal models: perplexity over the target tokens (from the decoder's logits)
and ROUGE of the greedy outputs, base against adapter:"""),
    ("code", "%qlora_eval --base --metrics perplexity,rouge --max-new-tokens 4"),
    ("code", "%qlora_generate --greedy --max-new-tokens 4 summarize: Critics agreed that the music was superb."),
    ("md", """The merge works the same way for an encoder-decoder (`AutoModelForSeq2SeqLM`); its check compares greedy
outputs and the loss on held-out rows:"""),
    ("code", """shutil.rmtree("runs/merged/tiny-t5", ignore_errors=True)
%qlora_merge runs/merged/tiny-t5 --max-new-tokens 4"""),
    ("code", """from transformers import AutoModelForSeq2SeqLM

summarizer = AutoModelForSeq2SeqLM.from_pretrained("runs/merged/tiny-t5")
inputs = tokenizer("summarize: Critics agreed that the music was superb.", return_tensors="pt")
print(tokenizer.decode(summarizer.generate(**inputs, max_new_tokens=4, do_sample=False)[0], skip_special_tokens=True))"""),
    ("md", """From random weights, 30 steps teach the tiny T5 the form of the answer (one label word, perplexity down by
orders of magnitude) but not yet which word: a pretrained encoder-decoder brings that. The same cells with
`%qlora_load google/flan-t5-base --task seq2seq` and `data: cnn_dailymail` (prompt `summarize: {article}`,
response `{highlights}`) are the course's slide 12."""),
]

ADAPTIVE = [
    ("md", """# Adaptive quantization: `--bits auto`

Slide 14 of the course lists *adaptive quantization* among QLoRA's future directions: not every layer suffers
equally from 4-bit weights, so spend the bits where they matter. `%qlora_load --bits auto` does this:

1. **measure**: the unquantized model reads a few calibration texts (rows of the shipped `word_forms` data in
   the chat template) while hooks sample each linear layer's inputs X; for each layer, the relative output
   error of its weight W after a quantization round trip, ‖X(Q(W) − W)ᵀ‖ / ‖XWᵀ‖, for **NF4** (as `--bits 4`
   stores it) and for **LLM.int8** (as `--bits 8` does);
2. **choose**: rank the layers by the error 4-bit adds over 8-bit *per parameter* and keep the top ones in
   8-bit, up to `--keep-8bit` (default 0.25) of the quantized parameters;
3. **report**: the same model, its weights swapped for their round trips, scores ten *other* calibration texts
   as uniform 8-bit, the mix and uniform 4-bit: footprint and perplexity of each against 16 bits;
4. **build**: NF4 for the rest, bitsandbytes `Linear8bitLt` for the chosen layers, LoRA on both."""),
    ("code", SETUP),
    ("code", "%qlora_load --bits auto"),
    ("md", """The readout's indented rows are the comparison: **uniform 8-bit / auto / uniform 4-bit**, each with its weight
footprint and the calibration perplexity next to the 16-bit model's. In numbers:"""),
    ("code", """adaptive = qm.get_session().last_load_report.adaptive
ppl = {kind: adaptive.perplexity(kind) for kind in ("16-bit", "8-bit", "auto", "4-bit")}
mb = {kind: size / 1e6 for kind, size in adaptive.footprints.items()}
kept = (ppl["4-bit"] - ppl["auto"]) / (ppl["4-bit"] - ppl["8-bit"])
print(f"memory saved vs uniform 8-bit: {mb['8-bit'] - mb['auto']:.1f} MB "
      f"({1 - mb['auto'] / mb['8-bit']:.0%}); uniform 4-bit would save {mb['8-bit'] - mb['4-bit']:.1f} MB")
print(f"perplexity: 16-bit {ppl['16-bit']:.2f}, 8-bit {ppl['8-bit']:.2f}, auto {ppl['auto']:.2f}, 4-bit {ppl['4-bit']:.2f}")
print(f"auto closes {kept:.0%} of the perplexity gap between uniform 4-bit and uniform 8-bit")"""),
    ("md", """## Which layers are sensitive

Every quantizable layer, most sensitive (per parameter) first. The `8-bit` column is the choice:"""),
    ("code", "adaptive.to_dataframe(top=12)"),
    ("code", r"""import matplotlib.pyplot as plt
import pandas as pd
from qlora_magic.adaptive import short_name

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
plt.show()"""),
    ("code", """table.groupby("kind")["8-bit"].agg(["sum", "count"]).rename(columns={"sum": "kept 8-bit", "count": "layers"})"""),
    ("md", """The value projections stand out: NF4 costs them the most output error, and they are small, so keeping them
in 8-bit buys much quality per byte; the small k projections follow for the same reason. At the default budget
all attention projections stay 8-bit and all MLP projections go 4-bit. Ranking by the *plain* excess error instead (which
favours the large MLP layers) kept less quality for the same footprint in our measurement (docs/user-guide.md).

`--keep-8bit` moves along the curve between uniform 4-bit (0) and uniform 8-bit (1). The choice for other
budgets, from the same measurement:"""),
    ("code", """from qlora_magic.adaptive import choose_layers_8bit

for fraction in (0.05, 0.1, 0.25, 0.5):
    print(f"--keep-8bit {fraction}: {len(choose_layers_8bit(adaptive.layers, fraction))} layers in 8-bit")"""),
    ("md", """## Fine-tune on the mix

Training works as on any quantized model. LoRA goes on `q_proj` and `v_proj` as usual, whichever kind each
layer is (the table above says which are 8-bit); bitsandbytes and PEFT handle both kinds in one model."""),
    ("code", """%%qlora_train --max-steps 10 --lr 1e-3 --batch-size 4 --grad-accum 1 --display text
data: $DATA
prompt: "Instruction: {instruction}\\n\\nInput: {context}\\n\\nResponse: "
response: '{response}'"""),
    ("code", """print(qm.generate(PROMPT.format(instruction="Give the opposite of the word.", context="early"),
                  raw=True, greedy=True, max_new_tokens=16, stream=False))"""),
    ("md", """## Save and restore the same mix

The saved adapter's `qlora_magic.json` records which layers were 8-bit, so `--adapter` rebuilds the same mix
without measuring again (no comparison rows in the readout this time):"""),
    ("code", """%qlora_save runs/adaptive-word-forms
%qlora_load --adapter runs/adaptive-word-forms"""),
    ("md", "`--keep-8bit` chooses layers for `--bits auto` only; elsewhere it is a one-line error:"),
    ("error", "%qlora_load --bits 4 --keep-8bit 0.3"),
]

NOTEBOOKS = {"08_evaluation.ipynb": EVALUATION, "09_adapters_and_merge.ipynb": ADAPTERS, "10_tuning.ipynb": TUNING,
             "11_classification_and_summarization.ipynb": TASKS, "12_adaptive_quantization.ipynb": ADAPTIVE}


def _course():
    spec = importlib.util.spec_from_file_location("make_course", ROOT / "scripts" / "make_course.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--execute", action="store_true")
    parser.add_argument("only", nargs="*")
    args = parser.parse_args()
    import nbformat

    course = _course()
    for name, cells in NOTEBOOKS.items():
        if args.only and not any(name.startswith(p) for p in args.only):
            continue
        path = course.NOTEBOOKS_DIR / name
        nb = course.build([("code" if kind == "error" else kind, src) for kind, src in cells])
        for cell, (kind, _) in zip(nb.cells, cells):
            if kind == "error":  # shows a one-line error on purpose; execution goes on
                cell.metadata["tags"] = ["raises-exception"]
        nbformat.write(nb, path)
        if args.execute:
            started = time.perf_counter()
            course._run_notebook_module().run(path, path.parent, timeout=900)
            print(f"executed {path.relative_to(ROOT)} in {time.perf_counter() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
