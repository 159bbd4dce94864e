"""The machinery: quantized loading with LoRA, the default model, data and tokenization, one Trainer run and
how it is made fast, generation, adapters and their folder on disk, memory readings. It works on a model and
a tokenizer it is handed; it never reads the session or the public `api`, and imports only `config`,
`errors`, `examples` and `display` (for the readouts it returns)."""
