# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Classification and summarization: `--task seq-cls` and `--task seq2seq`
#
# Slides 11 and 12 take QLoRA beyond answering prompts: sentiment classification (IMDB with DeBERTa-v3) and
# summarization (CNN/DailyMail with BART). Here both run offline on a CPU in about a minute:
#
# * **classification** on the embedded default model (SmolLM2-135M) with a new 2-class head, on short reviews
#   made up below. With a Hub connection, use `microsoft/deberta-v3-base` on `imdb` (see `docs/tasks.md`);
# * **summarization** on a tiny T5 built from a config (random weights: it shows the mechanics, not quality).
#   With a Hub connection, use `google/flan-t5-base` or `facebook/bart-base` on `cnn_dailymail`.

# %%
# %load_ext qlora_magic
import itertools
import qlora_magic as qm

GOOD = ["wonderful", "brilliant", "moving", "delightful", "superb", "charming"]
BAD = ["dull", "awful", "boring", "clumsy", "tedious", "dreadful"]
THINGS = ["acting", "plot", "film", "ending", "script", "music"]
REVIEWS = [{"text": f"The {thing} was {word}.", "sentiment": label}
           for thing, (word, label) in itertools.product(THINGS, [(w, "positive") for w in GOOD] + [(w, "negative") for w in BAD])]
len(REVIEWS), REVIEWS[0]

# %% [markdown]
# ## Sentiment classification
#
# `--task seq-cls` loads `AutoModelForSequenceClassification`: the quantized decoder plus a new `score` head of
# `--num-labels` outputs (default 2). LoRA goes on `q_proj`/`v_proj` as usual, and PEFT's `SEQ_CLS` task type
# keeps the head trainable (`modules_to_save`), so it is saved with the adapter.

# %%
# %qlora_load --task seq-cls --num-labels 2

# %% [markdown]
# The body names the text template (`prompt:`) and the label column (`label:`). String labels get ids in
# sorted order (`negative` = 0, `positive` = 1). With `eval_split`, every evaluation reports accuracy and macro F1
# on the held-out rows: here 18 reviews whose word and subject pairs were never seen in training.

# %%
# %%qlora_train --max-steps 20 --lr 1e-3 --batch-size 4 --grad-accum 1 --display text
data: $REVIEWS
prompt: "{text}"
label: sentiment
eval_split: 0.25

# %% [markdown]
# `qm.classify` gives each text's label and every class's probability, here on words not in the data:

# %%
qm.classify(["The soundtrack was fantastic.", "The story was painfully slow.", "A masterpiece of a film."])

# %% [markdown]
# A classifier does not generate text; `%qlora_generate` says what to use instead, in one line:

# %% tags=["raises-exception"]
# %qlora_generate The film was

# %% [markdown]
# ### Merging the classifier
#
# `%qlora_merge` reloads the base unquantized as `AutoModelForSequenceClassification` with the class names training
# learned, copies in the LoRA weights and the trained `score` head, merges and saves. The check predicts every
# held-out review with the adapter (on the 8-bit base) and with the saved model (on the original weights): the
# labels must agree, and the logits may move a little.

# %%
import shutil
shutil.rmtree("runs/merged/sentiment", ignore_errors=True)
# %qlora_merge runs/merged/sentiment

# %% [markdown]
# The merged folder is a plain transformers classifier (no peft, no bitsandbytes) that knows its labels:

# %%
from transformers import AutoModelForSequenceClassification, AutoTokenizer

classifier = AutoModelForSequenceClassification.from_pretrained("runs/merged/sentiment")
merged_tokenizer = AutoTokenizer.from_pretrained("runs/merged/sentiment")
batch = merged_tokenizer(["The soundtrack was fantastic.", "The story was painfully slow."], return_tensors="pt", padding=True)
print(classifier.config.id2label, [classifier.config.id2label[i] for i in classifier(**batch).logits.argmax(-1).tolist()])
del classifier

# %% [markdown]
# What the check measures is the distance between the adapter *as trained*, on 8-bit weights, and the merged
# model on the original 16-bit ones. The labels and the accuracy agree; the class probabilities move by a few
# hundredths on average (the check's `--tolerance 0.05` is on that mean), more on a row near the decision
# boundary. That drift comes from the quantization, not from the merge: `tests/test_merging.py` and a 16-bit load
# (`--bits 16`) give logits equal to the adapter's within about 1e-6 in float32.

# %% [markdown]
# ## Summarization with an encoder-decoder
#
# `--task seq2seq` loads `AutoModelForSeq2SeqLM`. Offline there is no pretrained one, so we build a 2-layer T5
# with random weights around the default model's tokenizer. An encoder-decoder needs `--task seq2seq`, and a
# decoder-only model cannot take it:

# %% tags=["raises-exception"]
# %qlora_load --task seq2seq

# %%
from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration
from qlora_magic.engine.default_model import default_model_path
import torch

tokenizer = AutoTokenizer.from_pretrained(default_model_path())
tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
config = T5Config(vocab_size=len(tokenizer), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                  decoder_start_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
torch.manual_seed(0)
T5ForConditionalGeneration(config).save_pretrained("runs/tiny-t5")
tokenizer.save_pretrained("runs/tiny-t5")

# %% [markdown]
# Without `--targets`, PEFT's table for T5 puts LoRA on `q` and `v`; a random model needs more, so all linear
# layers here. `prompt:` is the source and `response:` the target: the loss is on the target tokens only.

# %%
# %qlora_load runs/tiny-t5 --task seq2seq --targets all-linear

# %%
SUMMARIES = [{"article": r["text"].replace("The ", "Critics agreed that the "), "summary": r["sentiment"]} for r in REVIEWS]
SUMMARIES[0]

# %%
# %%qlora_train --max-steps 30 --lr 2e-2 --batch-size 4 --grad-accum 1 --display text
data: $SUMMARIES
prompt: "summarize: {article}"
response: "{summary}"
eval_split: 0.25

# %% [markdown]
# `%qlora_eval` works as for causal models: perplexity over the target tokens (from the decoder's logits)
# and ROUGE of the greedy outputs, base against adapter:

# %%
# %qlora_eval --base --metrics perplexity,rouge --max-new-tokens 4

# %%
# %qlora_generate --greedy --max-new-tokens 4 summarize: Critics agreed that the music was superb.

# %% [markdown]
# The merge works the same way for an encoder-decoder (`AutoModelForSeq2SeqLM`); its check compares greedy
# outputs and the loss on held-out rows:

# %%
shutil.rmtree("runs/merged/tiny-t5", ignore_errors=True)
# %qlora_merge runs/merged/tiny-t5 --max-new-tokens 4

# %%
from transformers import AutoModelForSeq2SeqLM

summarizer = AutoModelForSeq2SeqLM.from_pretrained("runs/merged/tiny-t5")
inputs = tokenizer("summarize: Critics agreed that the music was superb.", return_tensors="pt")
print(tokenizer.decode(summarizer.generate(**inputs, max_new_tokens=4, do_sample=False)[0], skip_special_tokens=True))

# %% [markdown]
# From random weights, 30 steps teach the tiny T5 the form of the answer (one label word, perplexity down by
# orders of magnitude) but not yet which word: a pretrained encoder-decoder brings that. The same cells with
# `%qlora_load google/flan-t5-base --task seq2seq` and `data: cnn_dailymail` (prompt `summarize: {article}`,
# response `{highlights}`) are the course's slide 12.
