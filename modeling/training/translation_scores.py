"""BLEU and chrF of translations with sacreBLEU, and their signatures, as an `evaluate` metric module.

    import evaluate
    from rskip.training.translation import TRANSLATION_METRIC  # the path of this file

    metric = evaluate.load(TRANSLATION_METRIC)  # read from disk: no network
    metric.compute(predictions=["Ein Mann fährt Rad."], references=["Ein Mann fährt Fahrrad."], bleu_tokenize="13a")
    # {'bleu': ..., 'chrf': ..., 'bleu_signature': 'nrefs:1|case:mixed|eff:no|tok:13a|...', 'chrf_signature': ...}

One reference per sentence. Scores are corpus-level and rounded to two decimals. `evaluate` loads this file as a
module of its own, so it imports nothing from rskip.
"""

import datasets
import evaluate
from sacrebleu.metrics import BLEU, CHRF

_CITATION = """\
@inproceedings{post-2018-call,
    title = "A Call for Clarity in Reporting {BLEU} Scores",
    author = "Post, Matt",
    booktitle = "Proceedings of the Third Conference on Machine Translation: Research Papers",
    year = "2018",
    pages = "186--191",
}
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): the translations.
    references (`list` of `str`): one reference translation per prediction.
    bleu_tokenize (`str`, defaults to "13a"): sacreBLEU's tokenizer for BLEU: 13a, intl, char, zh, ...
Returns:
    bleu, chrf (`float`): corpus BLEU and chrF, 0-100; bleu_signature, chrf_signature (`str`): sacreBLEU's signatures.
"""


class TranslationScores(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Corpus BLEU and chrF (sacreBLEU) with their signatures.",
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
            reference_urls=["https://github.com/mjpost/sacrebleu"],
        )

    def _compute(self, predictions, references, bleu_tokenize="13a"):
        bleu, chrf = BLEU(tokenize=bleu_tokenize), CHRF()
        return {
            "bleu": round(bleu.corpus_score(predictions, [references]).score, 2),
            "chrf": round(chrf.corpus_score(predictions, [references]).score, 2),
            "bleu_signature": str(bleu.get_signature()),
            "chrf_signature": str(chrf.get_signature()),
        }
