"""Sequence-classification evaluation against predictions and metrics computed by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import tiny_model
from conftest import word_tokenizer as shared_word_tokenizer
from hfcompress.errors import InvalidParameterError
from hfcompress.evaluation import accuracy, evaluate_classification, f1_score, predict_classes

datasets = pytest.importorskip("datasets")

WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "ran",
    "on",
    "mat",
    "and",
    "film",
    "plot",
    "was",
    "very",
    "good",
    "bad",
    "not",
]
TEXTS = [
    "the cat sat on the mat",
    "a dog ran",
    "the film was very good",
    "the plot was not good",
    "bad film",
    "a very bad plot and a bad film",
    "the dog sat",
    "good",
    "not very good and not very bad",
]


def word_tokenizer():
    return shared_word_tokenizer(WORDS)


def hand_predictions(model: nn.Module, tokenizer, texts: list[str]) -> list[int]:
    """Argmax class of each text run alone (no padding)."""
    predictions = []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            predictions.append(int(model(input_ids=ids).logits[0].argmax()))
    return predictions


def hand_macro_f1(predictions: list[int], references: list[int]) -> float:
    """Mean over classes present of 2PR / (P + R), with P = R = 0 giving 0."""
    scores = []
    for c in sorted(set(predictions) | set(references)):
        tp = sum(p == c and r == c for p, r in zip(predictions, references, strict=True))
        predicted = sum(p == c for p in predictions)
        actual = sum(r == c for r in references)
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        scores.append(2 * precision * recall / (precision + recall) if tp else 0.0)
    return sum(scores) / len(scores)


@pytest.fixture
def bert_case():
    """The tiny 3-class BERT, a tokenizer, and references that disagree with it 3 times of 9."""
    model, tokenizer = tiny_model("bert"), word_tokenizer()
    predicted = hand_predictions(model, tokenizer, TEXTS)
    labels = list(predicted)
    for i in (1, 4, 7):
        labels[i] = (labels[i] + 1) % 3
    dataset = datasets.Dataset.from_dict({"text": TEXTS, "label": labels})
    return model, tokenizer, dataset, predicted, labels


def test_accuracy_and_macro_f1_match_hand_computation(bert_case):
    model, tokenizer, dataset, predicted, labels = bert_case
    assert predict_classes(model, dataset, tokenizer, batch_size=4, progress=False) == (
        predicted,
        labels,
    )
    result = evaluate_classification(model, dataset, tokenizer, batch_size=4, progress=False)
    assert set(result) == {"accuracy", "f1"}
    assert result["accuracy"] == pytest.approx(6 / 9)
    assert result["f1"] == pytest.approx(hand_macro_f1(predicted, labels))


def test_pretokenized_dataset_needs_no_tokenizer(bert_case):
    model, tokenizer, dataset, predicted, labels = bert_case
    tokenized = dataset.map(lambda row: {"input_ids": tokenizer(row["text"])["input_ids"]})
    tokenized = tokenized.remove_columns("text")
    assert predict_classes(model, tokenized, batch_size=4, progress=False) == (predicted, labels)
    # with a tokenizer it pads through tokenizer.pad, and torch-formatted rows work too
    torch_format = tokenized.with_format("torch")
    assert (
        predict_classes(model, torch_format, tokenizer, batch_size=3, progress=False)[0]
        == predicted
    )


def test_sentence_pairs_and_training_mode(bert_case):
    model, tokenizer, _, _, _ = bert_case
    pairs = datasets.Dataset.from_dict({"a": TEXTS[:4], "b": TEXTS[4:8], "label": [0, 1, 2, 0]})
    with torch.no_grad():
        encoded = tokenizer(TEXTS[:4], TEXTS[4:8], padding=True, return_tensors="pt")
        expected = model(**encoded).logits.argmax(-1).tolist()
    model.train()
    predictions, _ = predict_classes(
        model, pairs, tokenizer, text_column=("a", "b"), progress=False
    )
    assert predictions == expected
    assert all(m.training for m in model.modules())


def test_two_labels_use_binary_f1(bert_case):
    model, tokenizer, _, _, _ = bert_case
    three = model.classifier
    model.classifier = nn.Linear(64, 2)
    with torch.no_grad():  # keep classes 1 and 2 of the 3-class head, so both get predicted
        model.classifier.weight.copy_(three.weight[1:])
        model.classifier.bias.copy_(three.bias[1:])
    predicted = hand_predictions(model, tokenizer, TEXTS)
    assert set(predicted) == {0, 1}
    labels = [1, 0, 1, 1, 0, 0, 1, 0, 1]
    binary = datasets.Dataset.from_dict({"text": TEXTS, "label": labels})
    result = evaluate_classification(model, binary, tokenizer, progress=False)
    tp = sum(p == 1 and r == 1 for p, r in zip(predicted, labels, strict=True))
    fp = sum(p == 1 and r == 0 for p, r in zip(predicted, labels, strict=True))
    fn = sum(p == 0 and r == 1 for p, r in zip(predicted, labels, strict=True))
    assert result["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    macro = evaluate_classification(model, binary, tokenizer, f1_average="macro", progress=False)
    assert macro["f1"] == pytest.approx(hand_macro_f1(predicted, labels))


def test_metric_functions_on_known_values():
    predictions, references = [0, 1, 1, 2, 2, 2], [0, 1, 2, 2, 2, 0]
    assert accuracy(predictions, references) == pytest.approx(4 / 6)
    # class 0: tp 1 fp 0 fn 1 -> 2/3; class 1: tp 1 fp 1 fn 0 -> 2/3; class 2: tp 2 fp 1 fn 1 -> 2/3
    assert f1_score(predictions, references, "macro") == pytest.approx(2 / 3)
    assert f1_score([1, 1, 0, 0], [1, 0, 1, 0]) == pytest.approx(0.5)
    assert f1_score([0, 0], [0, 0]) == 0.0  # no positive class at all: scikit-learn gives 0
    with pytest.raises(
        InvalidParameterError, match=r"average='binary': expected labels in \{0, 1\}, found \[2\]"
    ):
        f1_score(predictions, references)
    with pytest.raises(
        InvalidParameterError, match=r"predictions: expected as many as references \(6\), got 2"
    ):
        accuracy([0, 1], references)


def test_evaluate_modules_are_used_as_given(bert_case, tmp_path):
    evaluate = pytest.importorskip("evaluate")

    class MatchCount(evaluate.Metric):
        def _info(self):
            value = datasets.Value("int64")
            return evaluate.MetricInfo(
                description="number of matches",
                citation="",
                inputs_description="",
                features=datasets.Features({"predictions": value, "references": value}),
            )

        def _compute(self, predictions, references):
            return {
                "matches": sum(int(p == r) for p, r in zip(predictions, references, strict=True))
            }

    model, tokenizer, dataset, _, _ = bert_case
    metric = MatchCount(keep_in_memory=True, cache_dir=str(tmp_path))
    result = evaluate_classification(
        model, dataset, tokenizer, metrics=["accuracy", metric], progress=False
    )
    assert result == {"accuracy": pytest.approx(6 / 9), "matches": 6}


def test_unloadable_metric_names_it(bert_case, monkeypatch):
    evaluate = pytest.importorskip("evaluate")

    def offline(name, *args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(evaluate, "load", offline)
    model, tokenizer, dataset, _, _ = bert_case
    with pytest.raises(
        InvalidParameterError, match=r"metrics: evaluate.load\('matthews_correlation'\) failed"
    ):
        evaluate_classification(model, dataset, tokenizer, metrics=["matthews_correlation"])


def test_bad_inputs_name_the_argument(bert_case):
    model, tokenizer, dataset, _, _ = bert_case
    columns = r"\['text', 'label'\]"
    cases = [
        ({"label_column": "target"}, rf"label_column='target': .*columns are {columns}"),
        ({"text_column": "sentence"}, rf"text_column='sentence': .*columns are {columns}"),
        ({"batch_size": 0}, r"batch_size=0: expected an int ≥ 1"),
    ]
    for kwargs, match in cases:
        with pytest.raises(InvalidParameterError, match=match):
            evaluate_classification(model, dataset, tokenizer, progress=False, **kwargs)
    with pytest.raises(InvalidParameterError, match=r"tokenizer=None: .*'text' needs a tokenizer"):
        evaluate_classification(model, dataset, progress=False)
    unlabeled = datasets.Dataset.from_dict({"text": TEXTS[:2], "label": [-1, 3]})
    with pytest.raises(
        InvalidParameterError, match=r"label_column='label': labels \[-1, 3\] are outside \[0, 3\)"
    ):
        evaluate_classification(model, unlabeled, tokenizer, progress=False)
