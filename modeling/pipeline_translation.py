"""`pipeline("translation")` for encoder-decoder models.

transformers 5 removed its translation pipeline. Every saved RSkipMarian folder ships this one as
a custom pipeline (`custom_pipelines` in config.json), so that
`pipeline("translation", model=folder, trust_remote_code=True)` keeps working, with or without
rskip installed. With a model object: `TranslationPipeline(model=model, tokenizer=tokenizer)`.
"""

from transformers import Pipeline


class TranslationPipeline(Pipeline):
    """Translate text with `model.generate`; returns `[{"translation_text": ...}]` per input."""

    _pipeline_calls_generate = True
    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = True

    def _sanitize_parameters(self, truncation=None, max_source_length=None, clean_up_tokenization_spaces=None,
                             **generate_kwargs):
        preprocess_params = {}
        if truncation is not None:
            preprocess_params["truncation"] = truncation
        if max_source_length is not None:
            preprocess_params["max_length"] = max_source_length
        postprocess_params = {}
        if clean_up_tokenization_spaces is not None:
            postprocess_params["clean_up_tokenization_spaces"] = clean_up_tokenization_spaces
        return preprocess_params, generate_kwargs, postprocess_params

    def __call__(self, texts: str | list[str], **kwargs):
        """One text gives a list of translations (one per returned sequence); a list of texts gives one
        translation per text, or one list per text when several sequences are returned."""
        outputs = super().__call__(texts, **kwargs)
        if isinstance(texts, list) and all(len(output) == 1 for output in outputs):
            return [output[0] for output in outputs]
        return outputs

    def preprocess(self, text: str, truncation=True, max_length=None):
        if not isinstance(text, str):
            raise ValueError(f"translation inputs must be strings or lists of strings, got {type(text).__name__}")
        return self.tokenizer(text, truncation=truncation, max_length=max_length, return_tensors="pt")

    def _forward(self, model_inputs, **generate_kwargs):
        if hasattr(Pipeline, "_prepare_generate_kwargs"):  # transformers >= 5.20
            generate_kwargs = self._prepare_generate_kwargs(generate_kwargs)
        elif "generation_config" not in generate_kwargs:
            # Older pipelines merge their generation parameters into `self.generation_config` when created.
            generate_kwargs["generation_config"] = self.generation_config
        return {"output_ids": self.model.generate(**model_inputs, **generate_kwargs)}

    def postprocess(self, model_outputs, clean_up_tokenization_spaces=True):
        return [
            {"translation_text": self.tokenizer.decode(ids, skip_special_tokens=True,
                                                       clean_up_tokenization_spaces=clean_up_tokenization_spaces)}
            for ids in model_outputs["output_ids"]
        ]


__all__ = ["TranslationPipeline"]
