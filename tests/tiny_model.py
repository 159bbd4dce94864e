"""A tiny Llama model and tokenizer built offline, for fast real runs of the whole pipeline."""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "the cat sat on the mat", "the dog ran in the park", "what is the color of the sky",
    "the sky is blue", "grass is green", "question answer instruction input response",
    "hello world how are you today", "red green blue yellow black white orange purple",
    "one two three four five six seven eight nine ten",
] * 20
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<|im_start|>", "<|im_end|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<pad>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(folder: Path, hidden=64, layers=2) -> Path:
    """Save a 2-layer Llama (hidden 64) with random weights and its tokenizer into `folder`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        # Large enough that a frozen lm_head can separate tokens by several nats (0.02 caps it near 1).
        initializer_range=0.2,
    )
    return _save_seeded(LlamaForCausalLM, config, tokenizer, folder)


def toy_rows(n=48):
    """A learnable task: a fixed answer per colour word."""
    pairs = [("sky", "blue"), ("grass", "green"), ("sun", "yellow"), ("night", "black"),
             ("snow", "white"), ("fire", "red")]
    return [{"question": f"what is the color of the {a}", "answer": f"the {a} is {b}"} for a, b in (pairs * n)[:n]]


def build_tiny_t5(folder: Path, d_model=64, layers=2) -> Path:
    """Save a 2-layer T5 encoder-decoder (d_model 64) with random weights and the tiny tokenizer, for
    --task seq2seq. Its decoder starts from the pad token, as T5's does."""
    from transformers import T5Config, T5ForConditionalGeneration

    tokenizer = build_tokenizer()
    config = T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=16, d_ff=2 * d_model, num_layers=layers,
        num_decoder_layers=layers, num_heads=4, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False, initializer_factor=0.5,
    )
    return _save_seeded(T5ForConditionalGeneration, config, tokenizer, folder)


def _save_seeded(model_class, config, tokenizer, folder: Path) -> Path:
    """Random weights from seed 0 (the same model every run), saved with the tokenizer."""
    import torch

    torch.manual_seed(0)
    model = model_class(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def sentiment_rows(n=48):
    """A learnable classification: the colour word decides the class (string labels)."""
    words = [("blue", "calm"), ("green", "calm"), ("red", "angry"), ("black", "angry")]
    return [{"text": f"the sky is {w}", "sentiment": s} for w, s in (words * n)[:n]]


def summary_rows(n=48):
    """A learnable seq2seq task: the summary is the colour word of the sentence."""
    pairs = [("sky", "blue"), ("grass", "green"), ("fire", "red"), ("night", "black")]
    return [{"article": f"what is the color of the {a}", "summary": b} for a, b in (pairs * n)[:n]]
