"""scripts/demo.py (`make demo`): its generated task, and a miniature of the whole comparison."""

import demo
from rskip.experiments import number_task


def test_the_number_task_needs_reordering_and_its_splits_are_disjoint(tmp_path):
    folder = number_task.write_number_pairs(tmp_path, largest_number=999, train_size=50, eval_size=10, seed=0)
    splits = {split: {lang: (folder / f"{split}.{lang}").read_text().splitlines() for lang in ("en", "de")}
              for split in ("train", "valid", "test")}
    assert [len(splits[split]["en"]) for split in splits] == [50, 10, 10]
    assert all(len(pair["en"]) == len(pair["de"]) for pair in splits.values())
    assert not set(splits["train"]["en"]) & (set(splits["valid"]["en"]) | set(splits["test"]["en"]))
    assert number_task.num2words(342, lang="de") == "dreihundertzweiundvierzig"  # units before tens: "two and forty"


def test_a_miniature_demo_compares_both_variants(tmp_path, capsys):
    results = demo.main(["--output_dir", str(tmp_path), "--train_size", "200", "--eval_size", "8",
                         "--max_train_steps", "4", "--eval_steps", "2", "--config_overrides",
                         "encoder_layers=1,decoder_layers=1"])
    assert set(results) == {"post_ln", "rskip_ln"}
    for variant, result in results.items():
        assert result["skip"]["skip_variant"] == variant and result["steps"] == 4
        assert result["test"]["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:char")
    table = capsys.readouterr().out
    assert "variant    best step valid BLEU" in table and "\npost_ln " in table and "\nrskip_ln " in table
    assert (tmp_path / "comparison.png").stat().st_size > 0
