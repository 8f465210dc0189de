"""Llama-architecture decoder, Hugging Face checkpoint loading/saving, tokenizers.

    from dist.models import build_model, load_hf, save_hf, load_tokenizer
    model = build_model("tiny", seed=0)                 # or load_hf("path/to/hf-llama-dir")
    logits = model(input_ids, position_ids)            # [batch, seq] -> [batch, seq, vocab]
    losses = token_losses(logits[0], labels)           # float32 [seq], chunked cross-entropy
    model.set_attention(fn)                            # fn(q, k, v, *, causal, softmax_scale)
"""

from dist.models.hf import load_hf, save_hf
from dist.models.llama import PRESETS, Llama, ModelConfig, build_model
from dist.models.loss import token_losses
from dist.models.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = ["ModelConfig", "PRESETS", "Llama", "build_model", "load_hf", "save_hf", "load_tokenizer",
           "ByteTokenizer", "HFTokenizer", "token_losses"]
