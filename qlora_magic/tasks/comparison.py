"""The same prompts answered by the base model and by each adapter, side by side.

One model in memory: the base is the model with its adapters disabled, and each adapter is switched
on in turn (PEFT `disable_adapter` / `set_adapter`), so nothing is loaded twice.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..engine.adapters import BASE, adapter_names, check_adapter, using
from ..config import CompareConfig, GenerateConfig
from ..display.formatting import html_grid


PENDING = "…"


def compare_answers(session, config: CompareConfig, on_update=None) -> "Comparison":
    """Answer every prompt with every model of the comparison; `on_update(comparison)` receives the
    table so far (pending answers shown as …) after each answer, for a live display."""
    from ..engine.generation import generate_text

    model = session.require_model("comparison")
    adapters = config.adapters if config.adapters is not None else adapter_names(model)
    for name in adapters:
        check_adapter(model, name)
    columns = ([BASE] if config.base else []) + adapters
    answers = {name: [PENDING] * len(config.prompts) for name in columns}
    decoding = "sampled" if config.sample else "greedy"
    for name in columns:
        with using(model, name):
            for i, prompt in enumerate(config.prompts):
                generation = GenerateConfig(
                    prompt=prompt, max_new_tokens=config.max_new_tokens, raw=config.raw, system=config.system,
                    greedy=not config.sample, temperature=config.temperature, top_p=config.top_p,
                    seed=config.seed, stream=False,
                )
                text = generate_text(model, session.tokenizer, generation).strip()
                answers[name][i] = text
                if on_update:
                    on_update(Comparison(list(config.prompts), {k: list(v) for k, v in answers.items()}, decoding))
    return Comparison(list(config.prompts), answers, decoding)


@dataclass(repr=False)
class Comparison:
    """Prompts down, models across. `answers[model][i]` is the answer of `model` to prompt i."""

    prompts: list
    answers: dict
    decoding: str = "greedy"

    @property
    def title(self):
        return f"Comparison ({self.decoding}, {len(self.prompts)} prompts)"

    @property
    def models(self):
        return list(self.answers)

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame({"prompt": self.prompts, **self.answers})

    def __repr__(self):
        width = max(len(m) for m in self.models) + 1
        blocks = [self.title]
        for i, prompt in enumerate(self.prompts):
            lines = [f"[{i + 1}] {prompt.strip()}"]
            for name in self.models:
                answer = self.answers[name][i].replace("\n", "\n" + " " * (width + 4))
                lines.append(f"  {(name + ':').ljust(width)} {answer}")
            blocks.append("\n".join(lines))
        return "\n\n".join(blocks)

    def _repr_html_(self):
        rows = [[prompt, *(self.answers[m][i] for m in self.models)] for i, prompt in enumerate(self.prompts)]
        return html_grid(self.title, ["prompt", *self.models], rows, pre=True)
