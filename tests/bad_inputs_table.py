"""The bad inputs of tests/test_bad_inputs.py: what a new user might type into every magic and API verb.

A row is (id, what to run, the error kinds accepted). What to run is either the text of a cell (a line
magic, or a cell magic's line and body) or a function of the test's files `e` that calls the API. In cell
text, `@/` is the watched folder (the notebook's folder: data files, adapters, a plain file...) and `@tiny`
the tiny model's folder. Every row must fail in one line and leave the session and the files as they were.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from IPython.core.error import UsageError

import qlora_magic as qm
from qlora_magic.config import EvalConfig, GenerateConfig, LoadConfig, MergeConfig, TrainConfig
from qlora_magic.errors import AdapterError, ConfigError, DataError, ModelNotFoundError, NoModelError, QloraError

NAN, INF = float("nan"), float("inf")

# The error kinds a row accepts. Option syntax may be refused by argparse (UsageError) or by the config
# (ConfigError); the promise is one line either way.
OPTION = (ConfigError, UsageError)
DATA = (DataError, ConfigError)
ADAPTER = (AdapterError, ModelNotFoundError, ConfigError)
MODEL = (ModelNotFoundError, ConfigError)
NO_MODEL = (NoModelError,)
ANY = (QloraError, UsageError)


@dataclass
class Row:
    id: str
    run: str | Callable  # a cell's text, or e -> an API call
    expect: tuple = OPTION
    session: str = "causal-lm"  # the session it runs in: the tiny causal LM, "seq-cls" (a classifier) or "none"
    needs_no_cuda: bool = False  # only bad where torch sees no GPU

    @property
    def is_cell(self) -> bool:
        return isinstance(self.run, str)


ROWS: list[Row] = []


def row(id, run, expect=OPTION, **flags):
    ROWS.append(Row(id, run, expect, **flags))


# --- the bodies bad options go with: they parse, and train at most one step ----------------------------------

TRAIN = ('data: @/data/good.jsonl\nprompt: "Q: {question}\\nA: "\nresponse: "{answer}"\n'
         "max_steps: 1\ndisplay: none\n")
TUNE = TRAIN + "eval_split: 0.25\ntrials: 2\nsearch:\n  r: [4, 8]\n"
GOOD_ROWS = dict(prompt="Q: {question}\nA: ", response="{answer}", max_steps=1, display="none")


def train_body(**changes):
    """TRAIN with keys changed (value None: the key removed)."""
    lines = dict(line.split(": ", 1) for line in TRAIN.strip().split("\n"))
    for key, value in changes.items():
        if value is None:
            lines.pop(key, None)
        else:
            lines[key] = value
    return "".join(f"{k}: {v}\n" for k, v in lines.items())


def tune_body(search="  r: [4, 8]\n", **changes):
    body = train_body(**{"eval_split": "0.25", "trials": "2", **changes})
    return body + (f"search:\n{search}" if search is not None else "")


# --- %qlora_load and qm.load ------------------------------------------------------------------------------------

for option, values in {
    "--r": ["nan", "0", "-1", "100000000", "abc", "2.5"],
    "--alpha": ["nan", "inf", "-inf", "-1", "0", "abc"],
    "--dropout": ["nan", "inf", "-0.1", "1", "abc"],
}.items():
    for value in values:
        row(f"load{option}={value}", f"%qlora_load @tiny {option} {value}")
for value in ["nan", "inf", "-0.1", "1.5", "abc"]:
    row(f"load--keep-8bit={value}", f"%qlora_load @tiny --bits auto --keep-8bit {value}")
for value in ["nan", "0", "1", "-1", "abc"]:
    row(f"load--num-labels={value}", f"%qlora_load @tiny --task seq-cls --num-labels {value}")
for value in ["3", "abc", "32", "nan"]:
    row(f"load--bits={value}", f"%qlora_load @tiny --bits {value}")
for value in ["bogus", '""', "causal_lm"]:
    row(f"load--task={value}", f"%qlora_load @tiny --task {value}")
row("load--task=seq2seq-on-a-decoder", "%qlora_load @tiny --task seq2seq", MODEL)
row("load--bits-auto-with-seq-cls", "%qlora_load @tiny --bits auto --task seq-cls")
row("load--keep-8bit-without-auto", "%qlora_load @tiny --bits 8 --keep-8bit 0.3")
for value in ["tpu", "gpu", "cuda:x"]:
    row(f"load--device={value}", f"%qlora_load @tiny --device {value}")
row("load--device=cuda-without-gpu", "%qlora_load @tiny --device cuda", needs_no_cuda=True)
for value in ("balanced", "sequential", "0", "''"):
    row(f"load--device-map={value}", f"%qlora_load @tiny --device-map {value}")
row("load--device-map-auto-on-cpu", "%qlora_load @tiny --device cpu --device-map auto")
for value in ['""', ",,", "bogus_proj", "q_proj,bogus_proj"]:
    row(f"load--targets={value}", f"%qlora_load @tiny --targets {value}")
row("load-unknown-option", "%qlora_load @tiny --bogus 1", OPTION)
row("load-train-option", "%qlora_load @tiny --lr 1e-3", OPTION)
row("load-unclosed-quote", '%qlora_load "@tiny', OPTION)
row("load-missing-folder", "%qlora_load @/no_such_model", MODEL)
row("load-missing-folder-quoted-with-space", '%qlora_load "@/no such model"', MODEL)
row("load-a-file", "%qlora_load @/a_file.txt", MODEL)
row("load-empty-folder", "%qlora_load @/empty_dir", MODEL)
row("load-folder-without-config", "%qlora_load @/data", MODEL)
for name in ["missing", "bad_json", "truncated", "noweights", "rmismatch", "bin_only", "bad_run_json", "not_lora", "empty_dir"]:
    row(f"load--adapter={name}", f"%qlora_load --adapter @/adapters/{name}", ADAPTER)
row("load--adapter-of-another-base", "%qlora_load @tiny --adapter @/adapters/otherbase", ADAPTER)
row("load--adapter-with--r", "%qlora_load --adapter @/adapters/good --r 16")
row("load--adapter-a-file", "%qlora_load --adapter @/a_file.txt", ADAPTER)

row("api-load-alpha=nan", lambda e: qm.load(e.tiny, alpha=NAN))
row("api-load-alpha=inf", lambda e: qm.load(e.tiny, alpha=INF))
row("api-load-r=0", lambda e: qm.load(e.tiny, r=0))
row("api-load-r='8'", lambda e: qm.load(e.tiny, r="8"))
row("api-load-r=8.5", lambda e: qm.load(e.tiny, r=8.5))
row("api-load-dropout=1.0", lambda e: qm.load(e.tiny, dropout=1.0))
row("api-load-dropout=nan", lambda e: qm.load(e.tiny, dropout=NAN))
row("api-load-targets=[]", lambda e: qm.load(e.tiny, targets=[]))
row("api-load-task=None", lambda e: qm.load(e.tiny, task=None))
row("api-load-model=5", lambda e: qm.load(5), MODEL + (ConfigError,))
row("api-load-device=tpu", lambda e: qm.load(e.tiny, device="tpu"))
row("api-load-keep_8bit=nan", lambda e: qm.load(e.tiny, bits="auto", keep_8bit=NAN))
row("api-load-num_labels=nan", lambda e: qm.load(e.tiny, task="seq-cls", num_labels=NAN))
row("api-load-config-and-options", lambda e: qm.load(config=LoadConfig(model=e.tiny), r=4))
row("api-load-adapter-a-file", lambda e: qm.load(adapter=e.p("a_file.txt")), ADAPTER)
row("api-load-adapter-truncated", lambda e: qm.load(adapter=e.p("adapters/truncated")), ADAPTER)

# --- %%qlora_train and qm.train -------------------------------------------------------------------------------

for option, values in {
    "--epochs": ["nan", "inf", "-1", "0", "abc", "1e9"],
    "--max-steps": ["nan", "-1", "0", "1.5", "abc"],
    "--batch-size": ["nan", "0", "-1", "2.5"],
    "--grad-accum": ["nan", "0", "-1"],
    "--lr": ["nan", "inf", "-1", "0", "abc"],
    "--warmup": ["nan", "inf", "-0.5", "1", "1.5"],
    "--scheduler": ["bogus", '""', "5"],
    "--weight-decay": ["nan", "inf", "-1"],
    "--max-length": ["nan", "0", "-5"],
    "--eval-steps": ["0", "-1"],
    "--logging-steps": ["0", "-1"],
    "--seed": ["-1", str(2**40), str(2**70), "abc", "nan"],
    "--max-memory": ["nan", "inf", "-1GB", "abc"],
    "--display": ["bogus"],
    "--gpus": ["0", "-1", "abc", "1.5", "nan", "2000"],
    "--processes": ["0", "-1", "abc", "1.5"],
    "--strategy": ["bogus", "zero3"],
}.items():
    for value in values:
        row(f"train{option}={value}", f"%%qlora_train {option} {value}\n{TRAIN}")
for name, path in [("a-file", "@/a_file.txt"), ("under-a-file", "@/a_file.txt/run"), ("under-proc", "/proc/qlora_run"),
                   ("300-chars", "@/" + "a" * 300), ("unclosed-quote", '"@/runs/x')]:
    row(f"train--output-dir={name}", f"%%qlora_train --output-dir {path}\n{TRAIN}")
row("train--output-dir=$undefined", f"%%qlora_train --output-dir $undefined_dir\n{TRAIN}")
row("train-unknown-option", f"%%qlora_train --learning-rate 1e-3\n{TRAIN}")
row("train--report-to-unknown", f"%%qlora_train --report-to comet\n{TRAIN}")
row("train--report-to-empty", f"%%qlora_train --report-to ''\n{TRAIN}")
row("train--report-to-none-and-mlflow", f"%%qlora_train --report-to none,mlflow\n{TRAIN}")
row("train-body-report_to-a-number", f"%%qlora_train\n{TRAIN}report_to: 3\n")
row("tune--report-to-unknown", f"%%qlora_tune --report-to mlflow,comet\n{TUNE}")
row("train--gpus-and--processes", f"%%qlora_train --gpus 2 --processes 2\n{TRAIN}")
row("train--strategy-without-workers", f"%%qlora_train --strategy fsdp\n{TRAIN}")
row("train--strategy-fsdp-on-cpu-processes", f"%%qlora_train --processes 2 --strategy fsdp\n{TRAIN}")
row("train--processes-3-uneven-batch", f"%%qlora_train --processes 3 --batch-size 4 --grad-accum 4\n{TRAIN}")
row("train--gpus=3-without-gpu", f"%%qlora_train --gpus 3\n{TRAIN}", needs_no_cuda=True)
row("train--gpus=all-without-gpu", f"%%qlora_train --gpus all\n{TRAIN}", needs_no_cuda=True)
row("train-body-gpus=lots", f"%%qlora_train\n{TRAIN}gpus: lots\n")
row("api-train-processes=2.5", lambda e: qm.train(e.rows, processes=2.5, **GOOD_ROWS))
row("train--packing=yes", f"%%qlora_train --packing=yes\n{TRAIN}")
for key, value in [("batch_size", ".nan"), ("max_steps", ".inf"), ("warmup", "abc"), ("epochs", ".nan"), ("lr", ".inf"),
                   ("lr", "abc"), ("lr", "[1]"), ("eval_split", "1.5"), ("eval_split", "-0.1"), ("eval_split", ".nan"),
                   ("max_length", "0"), ("max_length", ".nan"), ("seed", "-1"), ("seed", "abc"), ("display", "fancy"),
                   ("scheduler", "bogus"), ("max_memory", ".nan"), ("max_memory", "lots"), ("output_dir", "5"),
                   ("output_dir", "@/a_file.txt"), ("chat", "maybe"), ("packing", "3"),
                   ("gradient_checkpointing", "yes please"), ("logging_steps", ".inf"), ("grad_accum", "0"),
                   ("split", "[1, 2]"), ("max_steps", "-1"), ("weight_decay", ".nan")]:
    row(f"train-body-{key}={value}", f"%%qlora_train\n{train_body(**{key: value})}")
for key in ["epoch", "learning_rate", "bogus"]:
    row(f"train-body-unknown-key-{key}", f"%%qlora_train\n{TRAIN}{key}: 2\n")
row("train-body-search-key", f"%%qlora_train\n{TRAIN}search:\n  r: [4]\n")
for name, body in [("unclosed-bracket", "data: [unclosed\n"), ("unclosed-quote", "prompt: 'Q: {question}\n"),
                   ("tab-indent", "data: x\n\tprompt: y\n"), ("a-list", "- a\n- b\n"), ("plain-text", "just some text\n"),
                   ("nested-colon", "data: x: y\n"), ("python-tag", "prompt: !!python/object/apply:os.system ['true']\n"),
                   ("control-char", "data: \x06\n"), ("lone-surrogate", "prompt: \ud800\n")]:
    row(f"train-yaml-{name}", f"%%qlora_train\n{body}")
for name, changes, expect in [
    ("prompt-names-missing-column", {"prompt": '"Q: {nope}"'}, DATA),
    ("response-names-missing-column", {"response": '"{nope}"'}, DATA),
    ("prompt-lone-brace", {"prompt": '"Q: {"'}, DATA),
    ("prompt-positional", {"prompt": '"Q: {0}"'}, DATA),
    ("prompt-attribute", {"prompt": '"Q: {question.upper}"'}, DATA),
    ("response-a-number", {"response": "5"}, DATA),
    ("no-prompt", {"prompt": None}, DATA),
    ("no-response", {"response": None}, DATA),
    ("label-on-a-decoder", {"label": "answer", "response": None}, DATA),
    ("eval_split-more-than-the-rows", {"eval_split": "1000"}, DATA),
    ("max_length-too-short", {"max_length": "1"}, DATA),
    ("data-null", {"data": "null"}, DATA),
    ("data-a-number", {"data": "5"}, DATA),
    ("data-$undefined", {"data": "$undefined_rows"}, DATA),
    ("data-$a-number", {"data": "$five"}, DATA),
    ("data-$empty-list", {"data": "$empty"}, DATA),
    ("data-$not-dicts", {"data": "$not_dicts"}, DATA),
    ("data-$mixed-types", {"data": "$mixed_rows"}, DATA),
    ("data-$lone-surrogate", {"data": "$surrogate_rows"}, DATA),
]:
    row(f"train-{name}", f"%%qlora_train\n{train_body(**changes)}", expect)
for name in ["missing.jsonl", "empty.jsonl", "blank.jsonl", "mixed.jsonl", "notjson.jsonl", "truncated.json", "empty.csv",
             "header_only.csv", "rows.txt", "nodata"]:
    row(f"train-data-file-{name}", f"%%qlora_train\n{train_body(data='@/data/' + name)}", DATA)

row("api-train-lr=inf", lambda e: qm.train(e.rows, lr=INF, **GOOD_ROWS))
row("api-train-lr=nan", lambda e: qm.train(e.rows, lr=NAN, **GOOD_ROWS))
row("api-train-epochs=nan", lambda e: qm.train(e.rows, epochs=NAN, **GOOD_ROWS))
row("api-train-batch_size=2.5", lambda e: qm.train(e.rows, batch_size=2.5, **GOOD_ROWS))
row("api-train-batch_size='4'", lambda e: qm.train(e.rows, batch_size="4", **GOOD_ROWS))
row("api-train-seed=2**70", lambda e: qm.train(e.rows, seed=2**70, **GOOD_ROWS))
row("api-train-scheduler=bogus", lambda e: qm.train(e.rows, scheduler="bogus", **GOOD_ROWS))
row("api-train-output_dir=5", lambda e: qm.train(e.rows, output_dir=5, **GOOD_ROWS))
row("api-train-data=None", lambda e: qm.train(None, **GOOD_ROWS), DATA)
row("api-train-data=[]", lambda e: qm.train([], **GOOD_ROWS), DATA)
row("api-train-data=[1,2]", lambda e: qm.train([1, 2], **GOOD_ROWS), DATA)
row("api-train-lone-surrogate-row", lambda e: qm.train([{"question": "\ud800", "answer": "x"}] * 8, **GOOD_ROWS), DATA)
row("api-train-lone-surrogate-template", lambda e: qm.train(e.rows, **{**GOOD_ROWS, "prompt": "Q\ud800 {question}"}), DATA)
row("api-train-unknown-keyword", lambda e: qm.train(e.rows, learning_rate=1e-3, **GOOD_ROWS), ANY)

# --- %qlora_generate / %%qlora_generate and qm.generate ---------------------------------------------------------

for name, cell in [("empty", "%qlora_generate"), ("spaces", "%qlora_generate    "), ("only-options", "%qlora_generate --greedy"),
                   ("only-options-and---", "%qlora_generate --greedy --"), ("cell-empty", "%%qlora_generate --greedy\n"),
                   ("cell-blank-lines", "%%qlora_generate --greedy\n\n\n"), ("cell-and-line-prompt", "%%qlora_generate --greedy hi\nthere\n")]:
    row(f"generate-{name}", cell)
for option, values in {
    "--max-new-tokens": ["0", "-1", "nan", "abc", "1000000000"],
    "--temperature": ["nan", "inf", "-1", "0", "abc"],
    "--top-p": ["nan", "0", "1.5", "-1", "inf"],
    "--seed": ["-1", str(2**40), str(2**70), "abc"],
}.items():
    for value in values:
        row(f"generate{option}={value}", f"%qlora_generate {option} {value} what is the color of the sky")
row("generate--system-unclosed-quote", '%qlora_generate --system "be brief what is the sky')
row("generate--system-with--raw", '%qlora_generate --raw --system "be brief" what is the sky')
row("generate-lone-surrogate", "%qlora_generate --greedy what is \ud800", DATA + (ConfigError,))
row("api-generate-empty", lambda e: qm.generate("", greedy=True))
row("api-generate-None", lambda e: qm.generate(None, greedy=True))
row("api-generate-number", lambda e: qm.generate(5, greedy=True))
row("api-generate-list", lambda e: qm.generate(["a", "b"], greedy=True))
row("api-generate-max_new_tokens=nan", lambda e: qm.generate("hi", max_new_tokens=NAN))
row("api-generate-max_new_tokens=0.5", lambda e: qm.generate("hi", max_new_tokens=0.5))
row("api-generate-temperature=nan", lambda e: qm.generate("hi", temperature=NAN))
row("api-generate-top_p=2", lambda e: qm.generate("hi", top_p=2))
row("api-generate-seed=-1", lambda e: qm.generate("hi", seed=-1))
row("api-generate-seed=2**70", lambda e: qm.generate("hi", seed=2**70))
row("api-generate-config-and-options", lambda e: qm.generate(config=GenerateConfig(prompt="hi"), greedy=True))
row("api-generate-lone-surrogate", lambda e: qm.generate("what is \ud800", greedy=True, max_new_tokens=4), DATA + (ConfigError,))

# --- %qlora_save and qm.save -------------------------------------------------------------------------------------

for name, line in [("no-path", ""), ("two-paths", "@/a @/b"), ("a-file", "@/a_file.txt"), ("under-a-file", "@/a_file.txt/ad"),
                   ("under-a-file-quoted-with-space", '"@/a_file.txt/my ad"'), ("under-proc", "/proc/qlora_ro/ad"),
                   ("300-chars", "@/" + "a" * 300), ("folder-with-other-files", "@/occupied"), ("unclosed-quote", '"@/ad'),
                   ("empty-quotes", '""'), ("unknown-option", "--bogus @/ad")]:
    row(f"save-{name}", f"%qlora_save {line}")
row("api-save-None", lambda e: qm.save(None))
row("api-save-empty", lambda e: qm.save(""))
row("api-save-a-file", lambda e: qm.save(e.p("a_file.txt")))
row("api-save-under-proc", lambda e: qm.save("/proc/qlora_ro/ad"))
row("api-save-300-chars", lambda e: qm.save(e.p("a" * 300)))
row("api-save-number", lambda e: qm.save(5))

# --- %qlora_memory, %qlora_panel -----------------------------------------------------------------------------------

for magic in ("qlora_memory", "qlora_panel"):
    for name, line in [("stray-word", "now"), ("unknown-option", "--bogus"), ("unclosed-quote", '"x')]:
        row(f"{magic[6:]}-{name}", f"%{magic} {line}")

# --- %qlora_eval / %%qlora_eval and qm.evaluate -----------------------------------------------------------------

for option, values in {
    "--metrics": ["bogus", '""', ",", "perplexity,bogus"],
    "--limit": ["0", "-1", "nan", "abc"],
    "--batch-size": ["0", "-1", "nan"],
    "--max-new-tokens": ["0", "-1", "1000000000"],
    "--adapters": ["nope", ","],
}.items():
    for value in values:
        row(f"eval{option}={value}", f"%qlora_eval --metrics bleu {option} {value}" if option == "--max-new-tokens"
            else f"%qlora_eval {option} {value}", OPTION + (AdapterError,))
for name in ["missing.jsonl", "empty.jsonl", "notjson.jsonl", "mixed.jsonl"]:
    row(f"eval--data={name}", f"%qlora_eval --data @/data/{name}", DATA)
row("eval--data=$undefined", "%qlora_eval --data $undefined_rows", DATA)
row("eval-unknown-option", "%qlora_eval --bogus")
row("eval-unclosed-quote", '%qlora_eval --data "@/data/good.jsonl')
row("eval--base=yes", "%qlora_eval --base=yes")
EVAL = 'data: @/data/good.jsonl\nprompt: "Q: {question}\\nA: "\nresponse: "{answer}"\n'
for name, body in [("metrics-null", "metrics: null\n"), ("metrics-bogus", "metrics: [bogus]\n"), ("metrics-number", "metrics: 5\n"),
                   ("limit-nan", "limit: .nan\n"), ("batch_size-inf", "batch_size: .inf\n"), ("max_length-negative", "max_length: -1\n"),
                   ("unknown-key", "bogus: 1\n"), ("adapters-number", "adapters: 1\n"), ("chat-maybe", "chat: maybe\n")]:
    row(f"eval-body-{name}", f"%%qlora_eval\n{EVAL}{body}")
row("eval-yaml-unclosed-bracket", "%%qlora_eval\ndata: [unclosed\n")
row("eval-body-missing-column", '%%qlora_eval\ndata: @/data/good.jsonl\nprompt: "{nope}"\nresponse: "{answer}"\n', DATA)
row("eval-body-data-$undefined", "%%qlora_eval\ndata: $undefined_rows\n", DATA)
row("eval-body-data-$five", f"%%qlora_eval\n{EVAL.replace('@/data/good.jsonl', '$five')}", DATA)
row("api-evaluate-metrics=None", lambda e: qm.evaluate(metrics=None))
row("api-evaluate-metrics=bogus", lambda e: qm.evaluate(metrics="bogus"))
row("api-evaluate-limit=nan", lambda e: qm.evaluate(limit=NAN))
row("api-evaluate-batch_size=0", lambda e: qm.evaluate(batch_size=0))
row("api-evaluate-empty-rows", lambda e: qm.evaluate([], prompt="{question}", response="{answer}"), DATA)
row("api-evaluate-missing-column", lambda e: qm.evaluate(e.rows, prompt="{nope}", response="{answer}"), DATA)
row("api-evaluate-adapters-nope", lambda e: qm.evaluate(adapters=["nope"]), ADAPTER)

# --- %qlora_compare / %%qlora_compare and qm.compare ----------------------------------------------------------

for name, cell in [("empty", "%qlora_compare"), ("cell-empty", "%%qlora_compare\n"), ("cell-only-separator", "%%qlora_compare\n---\n"),
                   ("cell-two-separators", "%%qlora_compare\n---\n---\n"), ("cell-and-line-prompt", "%%qlora_compare hi\nthere\n")]:
    row(f"compare-{name}", cell)
for option, values in {
    "--max-new-tokens": ["0", "-1", "nan", "1000000000"],
    "--temperature": ["nan", "0", "-1", "inf"],
    "--seed": ["-1", str(2**70), "abc"],
}.items():
    for value in values:
        sample = "--sample " if option == "--temperature" else ""
        row(f"compare{option}={value}", f"%qlora_compare {sample}{option} {value} what is the sky")
row("compare--adapters=nope", "%qlora_compare --adapters nope what is the sky", OPTION + (AdapterError,))
row("compare--adapters=,", "%qlora_compare --adapters , what is the sky")
row("compare--no-base-no-adapters", "%qlora_compare --no-base --adapters , what is the sky")
row("compare--system-unclosed-quote", '%qlora_compare --system "be brief what is the sky')
row("api-compare-empty-list", lambda e: qm.compare([]))
row("api-compare-None", lambda e: qm.compare(None))
row("api-compare-number", lambda e: qm.compare(5))
row("api-compare-adapters-nope", lambda e: qm.compare(["hi"], adapters=["nope"]), ADAPTER)
row("api-compare-max_new_tokens=0", lambda e: qm.compare("hi", max_new_tokens=0))
row("api-compare-temperature=nan", lambda e: qm.compare("hi", sample=True, temperature=NAN))
row("api-compare-top_p=0", lambda e: qm.compare("hi", top_p=0))
row("api-compare-seed=-1", lambda e: qm.compare("hi", seed=-1))

# --- %qlora_adapters and the adapter verbs --------------------------------------------------------------------

for name, line, expect in [
    ("unknown-action", "frobnicate", OPTION), ("list-with-a-name", "list extra", OPTION), ("unknown-option", "--bogus", OPTION),
    ("add-no-name", "add", OPTION), ("add-not-a-word", "add 1bad", OPTION), ("add-base", "add base", OPTION),
    ("add-existing", "add default", ADAPTER), ("add-unclosed-quote", 'add "t', OPTION),
    ("add--r=0", "add t --r 0", OPTION), ("add--r=-1", "add t --r -1", OPTION), ("add--r=nan", "add t --r nan", OPTION),
    ("add--r=100000000", "add t --r 100000000", OPTION), ("add--r=abc", "add t --r abc", OPTION),
    ("add--alpha=0", "add t --alpha 0", OPTION), ("add--alpha=nan", "add t --alpha nan", OPTION),
    ("add--alpha=-1", "add t --alpha -1", OPTION), ("add--alpha=inf", "add t --alpha inf", OPTION),
    ("add--dropout=1", "add t --dropout 1", OPTION), ("add--dropout=nan", "add t --dropout nan", OPTION),
    ("add--dropout=-0.5", "add t --dropout -0.5", OPTION), ("add--targets=bogus_proj", "add t --targets bogus_proj", OPTION),
    ("add--targets=empty", 'add t --targets ""', OPTION), ("add--targets=,,", "add t --targets ,,", OPTION),
    ("load-no-path", "load", OPTION), ("load-a-file", "load @/a_file.txt", ADAPTER),
    ("load-missing-quoted-with-space", 'load "@/adapters/no such"', ADAPTER),
    ("load-existing-name", "load @/adapters/good --name default", ADAPTER),
    ("load-name-not-a-word", "load @/adapters/good --name 1bad", OPTION + ADAPTER),
    ("load-name-base", "load @/adapters/good --name base", OPTION + ADAPTER),
    ("switch-unknown", "switch nope", ADAPTER), ("switch-no-name", "switch", OPTION), ("switch-base", "switch base", ADAPTER),
    ("delete-unknown", "delete nope", ADAPTER), ("delete-no-name", "delete", OPTION), ("delete-the-only-one", "delete default", ADAPTER),
    ("combine-no-weights", "combine mix", OPTION + ADAPTER), ("combine-unknown-source", "combine mix --weights nope=1", ADAPTER),
    ("combine-weight-abc", "combine mix --weights default=abc", OPTION), ("combine-weight-nan", "combine mix --weights default=nan", OPTION),
    ("combine-weight-inf", "combine mix --weights default=inf", OPTION), ("combine-no-source-name", "combine mix --weights =1", OPTION + ADAPTER),
    ("combine-existing-name", "combine default --weights default=1", ADAPTER),
    ("combine-bogus-type", "combine mix --weights default=1 --combination bogus", OPTION + ADAPTER),
    ("combine-name-not-a-word", "combine 1bad --weights default=1", OPTION),
]:
    row(f"adapters-{name}", f"%qlora_adapters {line}", expect)
for name in ["missing", "bad_json", "truncated", "noweights", "otherbase", "rmismatch", "bin_only", "not_lora", "empty_dir"]:
    row(f"adapters-load-{name}", f"%qlora_adapters load @/adapters/{name} --name x_{name}", ADAPTER)

row("api-add_adapter-not-a-word", lambda e: qm.api.add_adapter("1bad"))
row("api-add_adapter-None", lambda e: qm.api.add_adapter(None))
row("api-add_adapter-r=0", lambda e: qm.api.add_adapter("t", r=0))
row("api-add_adapter-r=nan", lambda e: qm.api.add_adapter("t", r=NAN))
row("api-add_adapter-alpha=nan", lambda e: qm.api.add_adapter("t", alpha=NAN))
row("api-add_adapter-dropout=2", lambda e: qm.api.add_adapter("t", dropout=2))
row("api-add_adapter-targets=[]", lambda e: qm.api.add_adapter("t", targets=[]))
row("api-load_adapter-None", lambda e: qm.api.load_adapter(None), ADAPTER)
row("api-load_adapter-truncated", lambda e: qm.api.load_adapter(e.p("adapters/truncated"), "x"), ADAPTER)
row("api-load_adapter-otherbase", lambda e: qm.api.load_adapter(e.p("adapters/otherbase"), "x"), ADAPTER)
row("api-load_adapter-existing-name", lambda e: qm.api.load_adapter(e.p("adapters/good"), "default"), ADAPTER)
row("api-switch_adapter-unknown", lambda e: qm.api.switch_adapter("nope"), ADAPTER)
row("api-switch_adapter-None", lambda e: qm.api.switch_adapter(None), ADAPTER)
row("api-delete_adapter-unknown", lambda e: qm.api.delete_adapter("nope"), ADAPTER)
row("api-delete_adapter-the-only-one", lambda e: qm.api.delete_adapter("default"), ADAPTER)
row("api-combine-empty-weights", lambda e: qm.api.combine_adapters("mix", {}), OPTION + ADAPTER)
row("api-combine-None-weights", lambda e: qm.api.combine_adapters("mix", None), OPTION + ADAPTER)
row("api-combine-unknown-source", lambda e: qm.api.combine_adapters("mix", {"nope": 1}), ADAPTER)
row("api-combine-weight-nan", lambda e: qm.api.combine_adapters("mix", {"default": NAN}))
row("api-combine-weight-inf", lambda e: qm.api.combine_adapters("mix", {"default": INF}))
row("api-combine-weight-text", lambda e: qm.api.combine_adapters("mix", {"default": "abc"}))
row("api-combine-bogus-type", lambda e: qm.api.combine_adapters("mix", {"default": 1}, combination_type="bogus"), OPTION + ADAPTER)

# --- %qlora_merge and qm.merge -------------------------------------------------------------------------------------

for name, line in [("no-path", ""), ("--dtype=int8", "@/merged --dtype int8"), ("--max-new-tokens=0", "@/merged --max-new-tokens 0"),
                   ("--max-new-tokens=-1", "@/merged --max-new-tokens -1"), ("--max-new-tokens=nan", "@/merged --max-new-tokens nan"),
                   ("--tolerance=nan", "@/merged --tolerance nan"), ("--tolerance=-1", "@/merged --tolerance -1"),
                   ("--tolerance=inf", "@/merged --tolerance inf"), ("--tolerance=abc", "@/merged --tolerance abc"),
                   ("a-file", "@/a_file.txt"), ("under-a-file", "@/a_file.txt/merged"), ("under-proc", "/proc/qlora_ro/merged"),
                   ("300-chars", "@/" + "a" * 300), ("folder-with-other-files", "@/occupied"), ("unclosed-quote", '"@/merged'),
                   ("unknown-option", "@/merged --bogus")]:
    row(f"merge-{name}", f"%qlora_merge {line}")
row("merge--adapter=nope", "%qlora_merge @/merged --adapter nope", OPTION + ADAPTER)
row("api-merge-None", lambda e: qm.merge(None))
row("api-merge-empty", lambda e: qm.merge(""))
row("api-merge-dtype=int8", lambda e: qm.merge(e.p("merged"), dtype="int8"))
row("api-merge-tolerance=nan", lambda e: qm.merge(e.p("merged"), tolerance=NAN))
row("api-merge-max_new_tokens=0", lambda e: qm.merge(e.p("merged"), max_new_tokens=0))
row("api-merge-adapter=nope", lambda e: qm.merge(e.p("merged"), adapter="nope"), OPTION + ADAPTER)
row("api-merge-a-file", lambda e: qm.merge(e.p("a_file.txt")))
row("api-merge-data-missing-file", lambda e: qm.merge(e.p("merged"), data=e.p("data/missing.jsonl")), DATA)

# --- %%qlora_tune and qm.tune ------------------------------------------------------------------------------------

for option, values in {"--trials": ["0", "-1", "nan", "abc", "100000"], "--sampler-seed": ["-1", str(2**70), "abc"]}.items():
    for value in values:
        row(f"tune{option}={value}", f"%%qlora_tune {option} {value}\n{TUNE}")
row("tune-unknown-option", f"%%qlora_tune --bogus\n{TUNE}")
row("tune-unclosed-quote", f'%%qlora_tune --trials "2\n{TUNE}')
for name, body in [
    ("trials-0", tune_body(trials="0")), ("trials-inf", tune_body(trials=".inf")), ("trials--1", tune_body(trials="-1")),
    ("search-empty", tune_body(search="  {}\n")), ("search-a-number", train_body(eval_split="0.25", trials="2") + "search: 5\n"),
    ("no-search", tune_body(search=None)), ("r-0", tune_body(search="  r: [0]\n")), ("r-no-choices", tune_body(search="  r: []\n")),
    ("r-a-number", tune_body(search="  r: 5\n")), ("lr-nan-low", tune_body(search="  lr: {low: .nan, high: 1}\n")),
    ("lr-low-above-high", tune_body(search="  lr: {low: 1, high: 0.1}\n")),
    ("lr-log-from-0", tune_body(search="  lr: {low: 0, high: 1, log: true}\n")),
    ("unknown-option", tune_body(search="  bogus: [1]\n")), ("scheduler-bogus", tune_body(search="  scheduler: [bogus]\n")),
    ("batch_size-0", tune_body(search="  batch_size: [0]\n")), ("dropout-1.5", tune_body(search="  dropout: [1.5]\n")),
    ("r-nan", tune_body(search="  r: [.nan]\n")), ("lr-inf", tune_body(search="  lr: [.inf]\n")),
    ("alpha--1", tune_body(search="  alpha: [-1]\n")), ("targets-bogus", tune_body(search="  targets: [bogus_proj]\n")),
    ("no-eval_split", tune_body(eval_split=None)), ("no-data", tune_body(data=None)),
    ("data-$undefined", tune_body(data="$undefined_rows")),
]:
    row(f"tune-body-{name}", f"%%qlora_tune\n{body}", OPTION + DATA)
TUNE_ROWS = dict(GOOD_ROWS, eval_split=0.25, trials=2)
row("api-tune-search-empty", lambda e: qm.tune(e.rows, search={}, **TUNE_ROWS))
row("api-tune-search-None", lambda e: qm.tune(e.rows, search=None, **TUNE_ROWS))
row("api-tune-trials=0", lambda e: qm.tune(e.rows, search={"r": [4]}, **{**TUNE_ROWS, "trials": 0}))
row("api-tune-r=0", lambda e: qm.tune(e.rows, search={"r": [0]}, **TUNE_ROWS))
row("api-tune-lr-nan", lambda e: qm.tune(e.rows, search={"lr": {"low": NAN, "high": 1}}, **TUNE_ROWS))
row("api-tune-unknown-option", lambda e: qm.tune(e.rows, search={"bogus": [1]}, **TUNE_ROWS))
row("api-tune-no-eval_split", lambda e: qm.tune(e.rows, search={"r": [4]}, **{**TUNE_ROWS, "eval_split": None}))

# --- a classifier (--task seq-cls): qm.classify, and what does not apply to it -------------------------------

CLASSES = 'data: $sentiment\nprompt: "{text}"\nlabel: sentiment\nmax_steps: 1\ndisplay: none\n'
row("api-classify-a-decoder", lambda e: qm.classify(["the sky is blue"]))
for name, run, expect in [
    ("api-classify-empty", lambda e: qm.classify([]), OPTION),
    ("api-classify-None", lambda e: qm.classify(None), OPTION),
    ("api-classify-a-number", lambda e: qm.classify(5), OPTION),
    ("api-classify-batch_size=0", lambda e: qm.classify(["the sky is blue"], batch_size=0), OPTION),
    ("api-classify-batch_size=nan", lambda e: qm.classify(["the sky is blue"], batch_size=NAN), OPTION),
    ("api-classify-max_length=nan", lambda e: qm.classify(["the sky is blue"], max_length=NAN), OPTION),
    ("api-classify-max_length=0", lambda e: qm.classify(["the sky is blue"], max_length=0), OPTION),
    ("api-classify-lone-surrogate", lambda e: qm.classify(["the sky is \ud800"]), DATA),
    ("classifier-generate", "%qlora_generate --greedy what is the sky", OPTION),
    ("classifier-compare", "%qlora_compare what is the sky", OPTION),
    ("classifier-eval", "%qlora_eval", OPTION),
    ("classifier-train-label-missing-column", f"%%qlora_train\n{CLASSES.replace('label: sentiment', 'label: nope')}", DATA),
    ("classifier-train-response-not-label", "%%qlora_train\n" + CLASSES.replace("label: sentiment", 'response: "{sentiment}"'), DATA),
    ("classifier-train-too-many-classes", f"%%qlora_train\n{CLASSES.replace('$sentiment', '$six_classes')}", DATA),
    ("classifier-train-empty-labels", f"%%qlora_train\n{CLASSES.replace('$sentiment', '$unlabelled')}", DATA),
    ("classifier-train-negative-label-ids", f"%%qlora_train\n{CLASSES.replace('$sentiment', '$negative_ids')}", DATA),
    ("classifier-train--packing", f"%%qlora_train --packing\n{CLASSES}", OPTION),
    ("classifier-train-prompt-missing-column", f"%%qlora_train\n{CLASSES.replace('{text}', '{nope}')}", DATA),
]:
    row(name, run, expect, session="seq-cls")

# --- %qlora_export and qm.export ------------------------------------------------------------------------------------

for name, line in [("no-path", ""), ("no-format", "@/exported"), ("format=onnx", "onnx @/exported"),
                   ("--quant=q3_k", "gguf @/exported --quant q3_k"), ("--max-new-tokens=0", "gguf @/exported --max-new-tokens 0"),
                   ("--tolerance=nan", "gguf @/exported --tolerance nan"), ("--tolerance=abc", "gguf @/exported --tolerance abc"),
                   ("a-file", "gguf @/a_file.txt"), ("under-proc", "gguf /proc/qlora_ro/exported"),
                   ("folder-with-other-files", "gguf @/occupied"), ("unclosed-quote", 'gguf "@/exported'),
                   ("unknown-option", "gguf @/exported --bogus")]:
    row(f"export-{name}", f"%qlora_export {line}")
row("export--adapter=nope", "%qlora_export gguf @/exported --adapter nope", OPTION + ADAPTER)
row("api-export-None", lambda e: qm.export("gguf", None))
row("api-export-quant=int3", lambda e: qm.export("gguf", e.p("exported"), quant="int3"))
row("api-export-tolerance=nan", lambda e: qm.export("gguf", e.p("exported"), tolerance=NAN))
row("api-export-a-file", lambda e: qm.export("gguf", e.p("a_file.txt")))

# --- every verb with no model loaded ----------------------------------------------------------------------------

for name, run in [
    ("generate", "%qlora_generate hi"), ("train", f"%%qlora_train\n{TRAIN}"), ("save", "%qlora_save @/ad"),
    ("eval", "%qlora_eval"), ("compare", "%qlora_compare hi"), ("adapters-list", "%qlora_adapters"),
    ("adapters-add", "%qlora_adapters add t"), ("adapters-load", "%qlora_adapters load @/adapters/good"),
    ("merge", "%qlora_merge @/merged"), ("export", "%qlora_export gguf @/exported"), ("tune", f"%%qlora_tune\n{TUNE}"),
    ("api-classify", lambda e: qm.classify(["x"])), ("api-switch_adapter", lambda e: qm.api.switch_adapter("default")),
    ("api-combine", lambda e: qm.api.combine_adapters("mix", {"default": 1})), ("api-save", lambda e: qm.save(e.p("ad"))),
]:
    row(f"no-model-{name}", run, NO_MODEL + (ConfigError,), session="none")

# --- paths no file system takes, folders that are not what they seem, options another action owns ----------------

LONG = "@/" + "b" * 300
for name, cell, expect in [
    ("load-300-char-folder", f"%qlora_load {LONG}", MODEL), ("load-lone-surrogate-folder", "%qlora_load @/model\ud800", MODEL),
    ("load-an-adapter-folder-as-model", "%qlora_load @/adapters/good", MODEL),
    ("load--adapter-300-chars", f"%qlora_load --adapter {LONG}", ADAPTER),
    ("load-hub-id-not-cached", "%qlora_load no-such-org/no-such-model-xyz", MODEL),
    ("load--keep-8bit-with-bits-4", "%qlora_load @tiny --bits 4 --keep-8bit 0.3", OPTION),
    ("save-home-of-no-user", "%qlora_save ~no_such_user_xyz/ad", OPTION),
    ("save-the-notebook-folder", "%qlora_save .", OPTION), ("save-lone-surrogate", "%qlora_save @/ad\ud800", OPTION),
    ("merge-home-of-no-user", "%qlora_merge ~no_such_user_xyz/merged", OPTION),
    ("merge-into-an-adapter-folder", "%qlora_merge @/adapters/good", OPTION),
    ("merge-lone-surrogate", "%qlora_merge @/merged\ud800", OPTION),
    ("train-data-file-300-chars", f"%%qlora_train\n{train_body(data=LONG + '.jsonl')}", DATA),
    ("train-eval_split-leaves-no-training-rows", f"%%qlora_train\n{train_body(eval_split='0.999')}", DATA),
    ("train--max-length=1", f"%%qlora_train --max-length 1\n{TRAIN}", DATA),
    ("eval--data-300-chars", f"%qlora_eval --data {LONG}.jsonl", DATA),
    ("eval--adapters-one-unknown", "%qlora_eval --adapters default,nope", ADAPTER),
    ("compare--adapters-one-unknown", "%qlora_compare --adapters default,nope what is the sky", ADAPTER),
    ("generate--seed=2**32", f"%qlora_generate --seed {2**32} what is the sky", OPTION),
    ("adapters-load-300-chars", f"%qlora_adapters load {LONG}", ADAPTER),
    ("adapters-switch-extra-word", "%qlora_adapters switch default extra", OPTION),
    ("adapters-switch-with--r", "%qlora_adapters switch default --r 4", OPTION),
    ("adapters-add-with--weights", "%qlora_adapters add t --weights default=1", OPTION),
    ("adapters-load-with--r", "%qlora_adapters load @/adapters/good --name x --r 4", OPTION),
    ("adapters-delete-with--alpha", "%qlora_adapters delete nope --alpha 2", OPTION + ADAPTER),
]:
    row(name, cell, expect)
for name in ["scalar.json", "list_rows.jsonl", "bad.parquet"]:
    row(f"train-data-file-{name}", f"%%qlora_train\n{train_body(data='@/data/' + name)}", DATA)
row("api-save-null-byte", lambda e: qm.save(e.p("a\x00b")))
row("api-merge-null-byte", lambda e: qm.merge(e.p("m\x00b")))
row("api-load-null-byte", lambda e: qm.load(e.p("m\x00b")), MODEL)
row("api-load_adapter-null-byte", lambda e: qm.api.load_adapter(e.p("a\x00b")), ADAPTER)
row("api-train-null-byte-file", lambda e: qm.train(e.p("data/x\x00.jsonl"), **GOOD_ROWS), DATA)
row("api-generate-prompt-over-the-context", lambda e: qm.generate("the sky is blue " * 200, greedy=True, max_new_tokens=4))
row("api-compare-prompt-over-the-context", lambda e: qm.compare(["the sky is blue " * 200], max_new_tokens=4))
row("api-generate-greedy='yes'", lambda e: qm.generate("hi", greedy="yes"))
row("api-generate-stream='no'", lambda e: qm.generate("hi", greedy=True, stream="no"))
row("api-compare-a-prompt-not-text", lambda e: qm.compare(["what is the sky", 5]))
row("api-train-chat='yes'", lambda e: qm.train(e.rows, chat="yes", **GOOD_ROWS))
row("api-train-config-and-options", lambda e: qm.train(config=TrainConfig(data=e.rows, prompt="{question}", response="{answer}"), lr=1e-3))
row("api-evaluate-config-and-options", lambda e: qm.evaluate(config=EvalConfig(), limit=3))
row("api-merge-config-and-path", lambda e: qm.merge(e.p("merged"), config=MergeConfig(path=e.p("merged2"))))

row("api-load-calibration-one-text", lambda e: qm.load(e.tiny, bits="auto", calibration=["only one"]))
row("api-load-calibration-a-text", lambda e: qm.load(e.tiny, bits="auto", calibration="the sky is blue"))
row("api-load-layers_8bit-unknown", lambda e: qm.load(e.tiny, bits="auto", layers_8bit=["model.bogus.layer"]))
row("api-load-layers_8bit-without-auto", lambda e: qm.load(e.tiny, bits=8, layers_8bit=["model.layers.0.self_attn.q_proj"]))
row("api-train-prompt-a-number", lambda e: qm.train(e.rows, **{**GOOD_ROWS, "prompt": 5}))
row("api-train-label-a-number", lambda e: qm.train(e.rows, **{**GOOD_ROWS, "label": 5}))
row("api-generate-system-a-number", lambda e: qm.generate("hi", greedy=True, system=5))
row("api-compare-base='no'", lambda e: qm.compare("hi", base="no"))
row("api-evaluate-base='yes'", lambda e: qm.evaluate(base="yes"))
row("api-merge-verify='no'", lambda e: qm.merge(e.p("merged"), verify="no"))
row("api-tune-keep='yes'", lambda e: qm.tune(e.rows, search={"r": [4]}, keep="yes", **TUNE_ROWS))
row("api-tune-prune=5", lambda e: qm.tune(e.rows, search={"r": [4]}, prune=5, **TUNE_ROWS))

# --- %%qlora_data / qm.check_data and %qlora_doctor / qm.doctor ------------------------------------------------

row("data-unknown-option", f"%%qlora_data --bogus\n{TRAIN}")
row("data-unclosed-quote", f'%%qlora_data --max-length "2\n{TRAIN}')
row("data--max-length=0", f"%%qlora_data --max-length 0\n{TRAIN}")
row("data-body-unknown-key", f"%%qlora_data\n{TRAIN}bogus: 1\n")
row("data-missing-file", f"%%qlora_data\n{train_body(data='@/data/missing.jsonl')}", DATA)
row("data-no-data", f"%%qlora_data\n{train_body(data=None)}", OPTION + DATA)
row("data-$undefined", f"%%qlora_data\n{train_body(data='$undefined_rows')}", OPTION + DATA)
row("data-template-missing-column", f"%%qlora_data\n{train_body(prompt='{nope}')}", DATA)
row("data-no-response", f"%%qlora_data\n{train_body(response=None)}", OPTION)
row("no-model-data", f"%%qlora_data\n{TRAIN}", NO_MODEL + (ConfigError,), session="none")
row("api-check_data-max_length=nan", lambda e: qm.check_data(e.rows, **{**GOOD_ROWS, "max_length": NAN}))
row("api-check_data-config-and-options", lambda e: qm.check_data(config=TrainConfig(data=e.rows, prompt="{question}", response="{answer}"), lr=1e-3))
row("api-check_data-a-number", lambda e: qm.check_data(5, **GOOD_ROWS), DATA)
row("train-every-response-empty", f"%%qlora_train\n{train_body(response=repr(''))}", DATA)
row("doctor-unknown-option", "%qlora_doctor --bogus")
row("doctor--bits=16", "%qlora_doctor --bits 16")
row("doctor-two-models", "%qlora_doctor a b")
row("api-doctor-bits=3", lambda e: qm.doctor(bits=3))
row("api-doctor-model-a-number", lambda e: qm.doctor(5))

assert len({r.id for r in ROWS}) == len(ROWS), "row ids must be unique"

# Rows that still break the promise, as "<who fixes it>: <the cause>". They run as strict expected failures:
# when a fix makes one pass, the test fails until its line here is removed.
KNOWN_FAILURES: dict[str, str] = {}
assert set(KNOWN_FAILURES) <= {r.id for r in ROWS}, "a known failure names no row"
