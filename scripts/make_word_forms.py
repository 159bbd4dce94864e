"""Writes qlora_magic/examples/word_forms.jsonl: the small instruction set the course ships.

Three word tasks (opposites, plurals, past tenses) in the Dolly layout (instruction, context,
response) with one fixed answer sentence. The base SmolLM2-135M does not answer in that form;
a minute of LoRA training on a CPU teaches it, so the change is plain to see.
"""

import json
import random
from pathlib import Path

OPPOSITES = """hot cold|big small|fast slow|happy sad|light dark|early late|open closed|full empty|strong weak|rich poor
young old|high low|loud quiet|hard soft|wet dry|long short|thick thin|clean dirty|near far|up down
buy sell|win lose|push pull|begin end|give take|true false|safe dangerous|cheap expensive|heavy light|sweet sour
inside outside|day night|friend enemy|question answer|north south|east west|always never|first last|before after|above below""".replace("\n", "|").split("|")
PLURALS = """cat cats|dog dogs|child children|mouse mice|box boxes|city cities|leaf leaves|man men|woman women|tooth teeth
foot feet|person people|bus buses|baby babies|knife knives|wolf wolves|goose geese|story stories|church churches|potato potatoes
sheep sheep|fish fish|ox oxen|hero heroes|party parties|wish wishes|class classes|life lives|key keys|day days""".replace("\n", "|").split("|")
PAST = """go went|eat ate|see saw|run ran|write wrote|take took|give gave|buy bought|think thought|sing sang
swim swam|drink drank|fly flew|drive drove|speak spoke|break broke|choose chose|fall fell|know knew|bring brought
walk walked|play played|jump jumped|cook cooked|watch watched|talk talked|build built|sleep slept|teach taught|catch caught""".replace("\n", "|").split("|")

TASKS = [
    ("Give the opposite of the word.", OPPOSITES, 'The opposite of "{a}" is "{b}".'),
    ("Give the plural of the word.", PLURALS, 'The plural of "{a}" is "{b}".'),
    ("Give the past tense of the verb.", PAST, 'The past tense of "{a}" is "{b}".'),
]


def rows():
    for instruction, pairs, answer in TASKS:
        for pair in pairs:
            a, b = pair.split()
            yield {"instruction": instruction, "context": a, "response": answer.format(a=a, b=b)}


if __name__ == "__main__":
    data = list(rows())
    random.Random(0).shuffle(data)
    out = Path(__file__).resolve().parents[1] / "qlora_magic" / "examples" / "word_forms.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in data))
    print(f"{len(data)} rows -> {out}")
