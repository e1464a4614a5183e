"""Tokenizers and tiny text encoders built in code, for the `tiny` presets (no network, no files).

- CLIP-style tokenizer: byte-level BPE whose vocabulary is the 256 byte symbols (each also with the
  CLIP end-of-word suffix `</w>`) plus the two CLIP special tokens, and no merges: every character is
  a token. It is a real `transformers.CLIPTokenizer`, so it saves and loads with the pipeline.
- T5-style tokenizer: a unigram vocabulary of printable ASCII characters, with and without the
  sentencepiece word marker `▁`; a real `transformers.T5Tokenizer` (tokenizers backend).

Both use the constructor arguments that transformers 5.x takes (vocab/merges in memory), checked on
5.17 and 5.23. The encoders are tiny `CLIPTextModel(WithProjection)` / `T5EncoderModel` configs with
random weights, so the embeddings are meaningless but have the shapes the pipelines expect.
"""
from __future__ import annotations

import string

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
CLIP_MAX_LENGTH = 77


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode symbol table (what byte-level BPE vocabularies use)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    symbols = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            symbols.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(s) for s in symbols)))


def build_clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for symbol in _bytes_to_unicode().values():
        vocab[symbol] = len(vocab)
    for symbol in _bytes_to_unicode().values():
        vocab[symbol + "</w>"] = len(vocab)
    vocab[CLIP_BOS] = len(vocab)
    vocab[CLIP_EOS] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_MAX_LENGTH)


def build_t5_tokenizer(model_max_length: int = 512):
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    for ch in string.ascii_letters + string.digits + string.punctuation:
        # A word-initial character is one piece (-1.0) rather than "▁" + character (-2.0 - 1.5).
        pieces.append(("▁" + ch, -1.0))
        pieces.append((ch, -1.5))
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


def tiny_clip_config(tokenizer, hidden_size: int = 32, projection_dim: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        projection_dim=projection_dim,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CLIP_MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def tiny_t5_config(tokenizer, d_model: int = 32):
    from transformers import T5Config

    return T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=16,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",  # T5 v1.1, as in FLUX / SD3
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
