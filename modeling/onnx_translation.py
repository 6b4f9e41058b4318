"""Translation with ONNX Runtime over the files `rskip.export` writes: greedy and beam search in NumPy, step for step
the algorithm of transformers' `generate` (5.24: `_sample` and the vectorised `_beam_search`), driven by the
folder's generation config, so that the tokens are the ones `generate` gives.

    translator = OnnxTranslator("exported/")            # encoder.onnx, decoder_step.onnx, generation_config.json
    translator.translate(["seven hundred and two"])      # with the tokenizer saved beside them
    translator.generate(input_ids, attention_mask, num_beams=4)

Supported generation settings: greedy or beam search (`num_beams`), `max_length`/`max_new_tokens`,
`min_length`/`min_new_tokens`, `eos_token_id`, `pad_token_id`, `decoder_start_token_id`, `bad_words_ids` of single
tokens, `forced_eos_token_id`, `length_penalty` and `early_stopping`. Anything else that changes the tokens
(sampling, repetition penalties, several returned sequences, ...) is refused with a `ValueError` naming the field.
"""

import json
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer, GenerationConfig

try:
    import onnxruntime
except ImportError as error:  # the `onnx` extra
    raise ImportError("rskip.onnx_translation needs onnxruntime: pip install 'rskip[onnx]'") from error

DECODER_PROMPT_LENGTH = 1  # the decoder start token
# Settings `generate` reads that this translator does not implement, with the value that leaves the tokens alone.
NEUTRAL_SETTINGS = {
    "do_sample": False, "num_return_sequences": 1, "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0, "forced_bos_token_id": None,
    "suppress_tokens": None, "begin_suppress_tokens": None, "sequence_bias": None, "num_beam_groups": 1,
    "diversity_penalty": 0.0, "exponential_decay_length_penalty": None, "guidance_scale": None,
    "renormalize_logits": False, "remove_invalid_values": False, "constraints": None, "force_words_ids": None,
}


def _neutral(value, neutral) -> bool:
    return value == neutral or (value is None and neutral in (0, 0.0, 1, 1.0, False))


class OnnxTranslator:
    """Greedy and beam-search translation with ONNX Runtime sessions on ``encoder[_int8].onnx`` and
    ``decoder_step[_int8].onnx``."""

    def __init__(self, folder, int8: bool = False, session_options: "onnxruntime.SessionOptions | None" = None,
                 providers: list[str] | None = None):
        folder = Path(folder)
        manifest_file = folder / "export.json"
        if not manifest_file.is_file():
            raise FileNotFoundError(f"{folder} has no export.json: not a folder written by rskip-export")
        self.manifest = json.loads(manifest_file.read_text())
        if self.manifest.get("task") != "translation":
            raise ValueError(f"{folder} holds an export for {self.manifest.get('task')!r}, not translation")
        suffix = "_int8" if int8 else ""
        providers = providers or ["CPUExecutionProvider"]
        self.encoder = onnxruntime.InferenceSession(str(folder / f"encoder{suffix}.onnx"), session_options,
                                                    providers=providers)
        self.decoder = onnxruntime.InferenceSession(str(folder / f"decoder_step{suffix}.onnx"), session_options,
                                                    providers=providers)
        programs = self.manifest["programs"]
        self.encoder_outputs = programs["encoder"]["outputs"]
        self.decoder_inputs = programs["decoder_step"]["inputs"]
        self.decoder_outputs = programs["decoder_step"]["outputs"]
        self.num_layers = self.manifest["decoder_layers"]
        self.num_heads = self.manifest["decoder_attention_heads"]
        self.head_dim = self.manifest["head_dim"]
        self.generation_config = GenerationConfig.from_pretrained(folder)
        self.folder = folder
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = AutoTokenizer.from_pretrained(self.folder)
        return self._tokenizer

    def translate(self, texts: list[str], **generation_settings) -> list[str]:
        batch = self.tokenizer(texts, return_tensors="np", padding=True)
        tokens = self.generate(batch["input_ids"], batch["attention_mask"], **generation_settings)
        return self.tokenizer.batch_decode(tokens, skip_special_tokens=True)

    # Settings --------------------------------------------------------------------------------------------------------

    def settings(self, **overrides) -> GenerationConfig:
        """The folder's generation config with `overrides`, checked: what this translator cannot do is refused."""
        config = GenerationConfig.from_dict({**self.generation_config.to_dict(), **overrides})
        # `generate` fills the fields left unset (None) with these defaults (length_penalty 1.0, early_stopping False).
        for name, default in GenerationConfig._get_default_generation_params().items():
            if getattr(config, name, None) is None and name != "max_length":
                setattr(config, name, default)
        for name, neutral in NEUTRAL_SETTINGS.items():
            value = getattr(config, name, neutral)
            if not _neutral(value, neutral):
                raise ValueError(f"generation setting {name}={value!r} is not supported by OnnxTranslator; "
                                 f"allowed: {neutral!r}")
        for words in config.bad_words_ids or []:
            if len(words) != 1:
                raise ValueError(f"generation setting bad_words_ids has a sequence of {len(words)} tokens "
                                 f"({words}); allowed: single tokens")
        if config.eos_token_id is None or config.decoder_start_token_id is None:
            raise ValueError("the generation config needs eos_token_id and decoder_start_token_id")
        return config

    @staticmethod
    def _lengths(config: GenerationConfig) -> tuple[int, int]:
        """(max_length, min_length) in decoder tokens, the start token included, as `generate` derives them."""
        max_length = (DECODER_PROMPT_LENGTH + config.max_new_tokens if config.max_new_tokens is not None
                      else config.max_length if config.max_length is not None else 20)
        min_length = config.min_length or 0
        if config.min_new_tokens is not None:
            min_length = max(min_length, DECODER_PROMPT_LENGTH + config.min_new_tokens)
        return max_length, min_length

    # The model -------------------------------------------------------------------------------------------------------

    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> list[np.ndarray]:
        """The encoder's outputs: ``last_hidden_state`` and each layer's cross-attention keys and values."""
        return self.encoder.run(None, {"input_ids": input_ids.astype(np.int64),
                                       "attention_mask": attention_mask.astype(np.int64)})

    def decode_step(self, tokens: np.ndarray, encoder_attention_mask, past: list[np.ndarray], cross: list[np.ndarray]):
        """Last-position logits (float32) for one token per row, and the grown self-attention cache."""
        feeds = dict(zip(self.decoder_inputs, [tokens[:, None].astype(np.int64), encoder_attention_mask, *past,
                                               *cross]))
        logits, *present = self.decoder.run(None, feeds)
        return logits[:, -1].astype(np.float32), present

    def empty_cache(self, rows: int) -> list[np.ndarray]:
        """The self-attention cache before the first step: length 0."""
        return [np.zeros((rows, self.num_heads, 0, self.head_dim), np.float32) for _ in range(2 * self.num_layers)]

    # Search ----------------------------------------------------------------------------------------------------------

    def generate(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None, **generation_settings):
        """Token ids as `model.generate(input_ids, attention_mask=attention_mask, **generation_settings)` returns
        them: the decoder start token first, finished rows padded."""
        config = self.settings(**generation_settings)
        input_ids = np.asarray(input_ids, dtype=np.int64)
        if attention_mask is None:  # `generate` infers no mask for encoder-decoder models: every position counts
            attention_mask = np.ones_like(input_ids)
        attention_mask = np.asarray(attention_mask, dtype=np.int64)
        encoded = self.encode(input_ids, attention_mask)
        cross = encoded[1:]
        if (config.num_beams or 1) > 1:
            return self._beam_search(config, attention_mask, cross)
        return self._greedy(config, attention_mask, cross)

    def _process(self, config: GenerationConfig, sequences: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """The logits processors `generate` builds from these settings, in its order."""
        cur_len = sequences.shape[1]
        max_length, min_length = self._lengths(config)
        eos = _as_list(config.eos_token_id)
        if cur_len < min_length:
            scores = scores.copy()
            scores[:, eos] = -np.inf
        if config.bad_words_ids:
            scores = scores.copy()
            scores[:, [words[0] for words in config.bad_words_ids]] = -np.inf
        if config.forced_eos_token_id is not None and cur_len == max_length - 1:
            scores = np.full_like(scores, -np.inf)
            scores[:, _as_list(config.forced_eos_token_id)] = 0
        return scores

    def _greedy(self, config, attention_mask, cross):
        max_length, _ = self._lengths(config)
        eos = _as_list(config.eos_token_id)
        rows = attention_mask.shape[0]
        sequences = np.full((rows, 1), config.decoder_start_token_id, np.int64)
        unfinished = np.ones(rows, bool)
        past = self.empty_cache(rows)
        while True:
            logits, past = self.decode_step(sequences[:, -1], attention_mask, past, cross)
            tokens = self._process(config, sequences, logits).argmax(-1)
            if config.pad_token_id is not None:
                tokens = np.where(unfinished, tokens, config.pad_token_id)
            sequences = np.concatenate([sequences, tokens[:, None]], axis=1)
            unfinished &= ~np.isin(tokens, eos)
            if not unfinished.any() or sequences.shape[1] >= max_length:
                return sequences

    def _beam_search(self, config, attention_mask, cross):
        num_beams = config.num_beams
        max_length, _ = self._lengths(config)
        eos = _as_list(config.eos_token_id)
        length_penalty, early_stopping = config.length_penalty, config.early_stopping
        batch = attention_mask.shape[0]
        attention_mask = np.repeat(attention_mask, num_beams, axis=0)
        cross = [np.repeat(tensor, num_beams, axis=0) for tensor in cross]
        past = self.empty_cache(batch * num_beams)

        beams_to_keep = max(2, 1 + len(eos)) * num_beams
        top_num_beam_mask = np.arange(beams_to_keep) < num_beams
        pad = config.pad_token_id
        fill = (pad or eos[0]) if eos else -1
        cur_len = DECODER_PROMPT_LENGTH
        running_sequences = np.full((batch, num_beams, max_length), fill, np.int64)
        running_sequences[:, :, 0] = config.decoder_start_token_id
        sequences = running_sequences.copy()
        running_beam_scores = np.zeros((batch, num_beams), np.float32)
        running_beam_scores[:, 1:] = -1e9
        beam_scores = np.full((batch, num_beams), -1e9, np.float32)
        is_sent_finished = np.zeros((batch, num_beams), bool)
        improvable = np.ones((batch, 1), bool)  # transformers' is_early_stop_heuristic_unsatisfied
        running_beam_indices = np.full((batch, num_beams, max_length - cur_len), -1, np.int64)
        beam_indices = running_beam_indices.copy()
        batch_offset = np.arange(batch)[:, None] * num_beams

        while True:
            flat = running_sequences[:, :, :cur_len].reshape(batch * num_beams, cur_len)
            logits, past = self.decode_step(flat[:, -1], attention_mask, past, cross)
            log_probs = self._process(config, flat, _log_softmax(logits))
            vocab = log_probs.shape[-1]
            log_probs = (log_probs.reshape(batch, num_beams, vocab) + running_beam_scores[:, :, None]).reshape(
                batch, num_beams * vocab)

            # Top-k continuations over all beams of each sentence
            topk_indices = _topk(log_probs, beams_to_keep)
            topk_log_probs = np.take_along_axis(log_probs, topk_indices, axis=1)
            topk_beams = topk_indices // vocab
            topk_sequences = np.take_along_axis(running_sequences, topk_beams[:, :, None], axis=1)
            topk_beam_indices = np.take_along_axis(running_beam_indices, topk_beams[:, :, None], axis=1)
            topk_sequences[:, :, cur_len] = topk_indices % vocab
            topk_beam_indices[:, :, cur_len - DECODER_PROMPT_LENGTH] = topk_beams + batch_offset

            # Stopping criteria of each continuation: EOS, or the maximum length
            hits_stop = np.isin(topk_sequences[:, :, cur_len], eos) | (cur_len + 1 >= max_length)

            # The best num_beams unfinished continuations go on
            running_log_probs = topk_log_probs + hits_stop.astype(np.float32) * -1.0e9
            keep = _topk(running_log_probs, num_beams)
            running_sequences = np.take_along_axis(topk_sequences, keep[:, :, None], axis=1)
            running_beam_scores = np.take_along_axis(running_log_probs, keep, axis=1)
            running_beam_indices = np.take_along_axis(topk_beam_indices, keep[:, :, None], axis=1)

            # Finished continuations among the top num_beams join the finished hypotheses if they score better
            just_finished = hits_stop & top_num_beam_mask[None, :]
            finished_scores = topk_log_probs / np.float32((cur_len + 1 - DECODER_PROMPT_LENGTH) ** length_penalty)
            full = is_sent_finished.all(axis=-1, keepdims=True) & (early_stopping is True)
            finished_scores = finished_scores + full.astype(np.float32) * -1.0e9
            finished_scores = finished_scores + (~improvable).astype(np.float32) * -1.0e9
            finished_scores = finished_scores + (~just_finished).astype(np.float32) * -1.0e9
            merged_scores = np.concatenate([beam_scores, finished_scores], axis=1)
            best = _topk(merged_scores, num_beams)
            sequences = np.take_along_axis(np.concatenate([sequences, topk_sequences], axis=1), best[:, :, None], 1)
            beam_scores = np.take_along_axis(merged_scores, best, axis=1)
            beam_indices = np.take_along_axis(np.concatenate([beam_indices, topk_beam_indices], axis=1),
                                              best[:, :, None], axis=1)
            is_sent_finished = np.take_along_axis(np.concatenate([is_sent_finished, just_finished], axis=1), best,
                                                  axis=1)

            # The cache follows the beams that go on
            order = running_beam_indices[:, :, cur_len - DECODER_PROMPT_LENGTH].reshape(-1)
            past = [tensor[order] for tensor in past]

            cur_len += 1
            if early_stopping == "never" and length_penalty > 0.0:
                best_length = max_length - DECODER_PROMPT_LENGTH
            else:
                best_length = cur_len - DECODER_PROMPT_LENGTH
            best_running = running_beam_scores[:, :1] / np.float32(best_length ** length_penalty)
            worst_finished = np.where(is_sent_finished, beam_scores.min(axis=1, keepdims=True), -1.0e9)
            improvable = improvable & (best_running > worst_finished).any(axis=-1, keepdims=True)
            open_beams = not (is_sent_finished.all() and early_stopping is True)
            if not (improvable.any() and open_beams and not hits_stop.all()):
                break

        sequences, beam_indices = sequences[:, 0], beam_indices[:, 0]
        generated = int((beam_indices + 1).astype(bool).sum(axis=1).max())
        return sequences[:, :DECODER_PROMPT_LENGTH + generated]


def _as_list(token_ids) -> list[int]:
    if token_ids is None:
        return []
    return [int(token_ids)] if np.isscalar(token_ids) else [int(token) for token in token_ids]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _topk(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values of each row, largest first (ties: the lower index first), without sorting the
    whole row (beams × vocabulary entries)."""
    candidates = np.argpartition(-values, k - 1, axis=1)[:, :k]
    order = np.lexsort((candidates, -np.take_along_axis(values, candidates, axis=1)), axis=1)
    return np.take_along_axis(candidates, order, axis=1)


__all__ = ["OnnxTranslator"]
