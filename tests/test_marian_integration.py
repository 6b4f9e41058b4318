"""RSkipMarian with the rest of the ecosystem: Seq2SeqTrainer, pipeline, tokenizer."""

import json

import torch
from datasets import Dataset
from transformers import (
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    pipeline,
)

from rskip import RSkipMarianConfig, RSkipMarianMTModel, TranslationPipeline
from test_marian import TINY, perturb_


def test_trainer_divides_the_loss_by_gradient_accumulation_steps(tmp_path):
    """One optimizer step with 2 x 2 accumulated examples equals one SGD step on all 4 at once."""
    torch.manual_seed(0)
    model = perturb_(RSkipMarianMTModel(RSkipMarianConfig(**TINY)))
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, 99, (4, 6), generator=generator)
    labels = torch.randint(3, 99, (4, 5), generator=generator)
    dataset = Dataset.from_dict({"input_ids": input_ids.tolist(), "labels": labels.tolist()})

    args = Seq2SeqTrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=1,
        learning_rate=0.1, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1e9,
        use_cpu=True, report_to="none", save_strategy="no", logging_steps=1,
    )
    Seq2SeqTrainer(model=model, args=args, train_dataset=dataset).train()

    reference = perturb_(RSkipMarianMTModel(RSkipMarianConfig(**TINY)))
    reference.load_state_dict(initial, strict=False)
    reference.train()
    reference(input_ids=input_ids, labels=labels).loss.backward()
    for name, param in reference.named_parameters():
        if param.grad is None:
            continue
        expected = initial[name] - 0.1 * param.grad
        torch.testing.assert_close(model.get_parameter(name).detach(), expected, atol=1e-6, rtol=1e-5, msg=name)


def test_seq2seq_trainer_evaluates_with_generate(tmp_path, marian_tokenizer):
    tok = marian_tokenizer
    config = RSkipMarianConfig(**{**TINY, "vocab_size": len(tok), "pad_token_id": tok.pad_token_id,
                                  "decoder_start_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id})
    model = RSkipMarianMTModel(config)
    pairs = {"en": ["A dog runs.", "Two men sit on a bench."], "de": ["Ein Hund rennt.", "Zwei Männer sitzen."]}
    dataset = Dataset.from_dict(pairs).map(lambda b: tok(b["en"], text_target=b["de"]), batched=True,
                                           remove_columns=["en", "de"])
    args = Seq2SeqTrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, per_device_eval_batch_size=2, max_steps=2,
        predict_with_generate=True, generation_max_length=6, generation_num_beams=2, use_cpu=True,
        report_to="none", save_strategy="no",
    )
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=dataset, eval_dataset=dataset,
                             data_collator=DataCollatorForSeq2Seq(tok, model=model), processing_class=tok)
    trainer.train()
    predictions = trainer.predict(dataset).predictions
    assert predictions.shape[0] == 2
    assert (predictions[:, 6:] == tok.pad_token_id).all()  # generation_max_length; the rest is padding
    assert (predictions[:, 1:6] != tok.pad_token_id).any()


PIPELINE_WITHOUT_RSKIP = """
import json, sys
sys.modules["rskip"] = None
from transformers import pipeline
translator = pipeline("translation", model=sys.argv[1], trust_remote_code=True, num_beams=2, max_length=64)
print(json.dumps([output["translation_text"] for output in translator(json.loads(sys.argv[2]))]))
"""


def test_translation_pipeline_with_a_trained_marian_tokenizer(tmp_path, marian_tokenizer, multi30k_dir, run_python):
    """A tiny model overfits four Multi30k pairs; `pipeline("translation")` then reproduces them from the saved folder."""
    from conftest import read_lines

    tok = marian_tokenizer
    source, target = read_lines(multi30k_dir / "train.en.gz", 4), read_lines(multi30k_dir / "train.de.gz", 4)
    torch.manual_seed(0)
    config = RSkipMarianConfig(**{
        **TINY, "d_model": 64, "encoder_ffn_dim": 128, "decoder_ffn_dim": 128, "max_position_embeddings": 128,
        "vocab_size": len(tok), "pad_token_id": tok.pad_token_id, "decoder_start_token_id": tok.pad_token_id,
        "eos_token_id": tok.eos_token_id, "forced_eos_token_id": tok.eos_token_id,
    })
    model = RSkipMarianMTModel(config).train()
    batch = tok(source, text_target=target, padding=True, return_tensors="pt")
    batch["labels"][batch["labels"] == tok.pad_token_id] = -100
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(200):
        optimizer.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05

    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert type(AutoTokenizer.from_pretrained(tmp_path)).__name__ == "MarianTokenizer"
    translator = pipeline("translation", model=str(tmp_path), trust_remote_code=True, num_beams=2, max_length=64)
    assert [output["translation_text"] for output in translator(source)] == target
    assert translator(source[0]) == [{"translation_text": target[0]}]

    result = run_python(PIPELINE_WITHOUT_RSKIP, tmp_path, json.dumps(source))
    assert json.loads(result.stdout.strip().splitlines()[-1]) == target

    in_memory = TranslationPipeline(model=model.eval(), tokenizer=tok)
    assert in_memory(source[1], num_beams=2, max_length=64)[0]["translation_text"] == target[1]
