"""Sequence classification (--task seq-cls): accuracy and macro F1 for training's evaluation, and
`classify(texts)`, which gives each text's label and the probability of every class."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from ..display.formatting import html_grid, text_grid


def accuracy_and_f1(predictions, labels, num_labels: int | None = None) -> dict:
    """Accuracy and macro F1 (the unweighted mean of each class's F1; a class never predicted nor
    present counts as absent, as in scikit-learn's `zero_division` handling of empty classes).

    A few lines of numpy: neither scikit-learn nor `evaluate` is a dependency of this package.
    """
    import numpy as np

    predictions, labels = np.asarray(predictions), np.asarray(labels)
    classes = range(num_labels) if num_labels else np.union1d(predictions, labels)
    f1s = []
    for c in classes:
        tp = np.sum((predictions == c) & (labels == c))
        fp = np.sum((predictions == c) & (labels != c))
        fn = np.sum((predictions != c) & (labels == c))
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return {"accuracy": float(np.mean(predictions == labels)), "f1": float(np.mean(f1s)) if f1s else 0.0}


def classification_metrics(eval_prediction) -> dict:
    """Trainer's compute_metrics for a classifier: the logits' argmax against the label ids."""
    import numpy as np

    logits = eval_prediction.predictions
    logits = logits[0] if isinstance(logits, tuple) else logits
    return accuracy_and_f1(np.argmax(logits, axis=-1), eval_prediction.label_ids, logits.shape[-1])


def class_names(model) -> list[str]:
    """The classes in id order: the names training learned from the data (model.config.id2label)."""
    config = model.config
    return [str(config.id2label.get(i, f"LABEL_{i}")) for i in range(config.num_labels)]


def classify_texts(session, texts: list[str], batch_size: int = 16, max_length: int = 512) -> "Classifications":
    """The most likely class of each text (a list, as config.ClassifyConfig checks it), with every class's probability."""
    import torch

    model = session.require_model("classification")
    if session.task != "seq-cls":
        raise ConfigError("classify() needs a classifier: load one with --task seq-cls (qlora_magic.load(..., task='seq-cls')).")
    from .data import check_text

    for number, text in enumerate(texts, 1):
        check_text(text, f"text {number}")
    names = class_names(model)
    device = next(model.parameters()).device
    probabilities = []
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = session.tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True,
                                      truncation=True, max_length=max_length).to(device)
            probabilities += torch.softmax(model(**batch).logits.float(), dim=-1).tolist()
    return Classifications(texts, names, probabilities)


@dataclass(repr=False)
class Classifications:
    """One row per text: its label (the most likely class) and the probability of every class.

    >>> result.labels                 # ['positive', 'negative', ...]
    >>> result.probabilities[0]       # {'negative': 0.12, 'positive': 0.88}
    """

    texts: list
    names: list
    scores: list

    title = "Classification"

    @property
    def labels(self) -> list:
        return [self.names[max(range(len(p)), key=p.__getitem__)] for p in self.scores]

    @property
    def probabilities(self) -> list[dict]:
        return [dict(zip(self.names, p)) for p in self.scores]

    def __len__(self):
        return len(self.texts)

    def __getitem__(self, i):
        return {"text": self.texts[i], "label": self.labels[i], "probabilities": self.probabilities[i]}

    def _table(self):
        headers = ["text", "label", *map(str, self.names)]
        cells = [[t if len(t) <= 80 else t[:77] + "...", label, *(f"{p:.3f}" for p in scores)]
                 for t, label, scores in zip(self.texts, self.labels, self.scores)]
        return headers, cells

    def __repr__(self):
        return text_grid(self.title, *self._table())

    def _repr_html_(self):
        return html_grid(self.title, *self._table())
