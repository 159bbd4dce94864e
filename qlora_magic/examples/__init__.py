"""Small datasets shipped with qlora_magic for the course and the demo (no download needed)."""

from pathlib import Path

HERE = Path(__file__).parent


def path(name: str = "word_forms") -> str:
    """The path of a shipped dataset, e.g. `qlora_magic.examples.path("word_forms")`.

    word_forms: 100 rows (instruction, context, response): opposites, plurals and past tenses, each
    answered in one fixed sentence, like 'The opposite of "hot" is "cold".'
    """
    file = HERE / f"{name}.jsonl"
    if not file.exists():
        names = ", ".join(sorted(p.stem for p in HERE.glob("*.jsonl")))
        raise FileNotFoundError(f"No shipped dataset {name!r}; there are: {names}.")
    return str(file)
