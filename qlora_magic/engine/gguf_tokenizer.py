"""A byte-level BPE tokenizer as GGUF metadata: tokens, merges, special ids, chat template, and the pre-tokenizer.

llama.cpp splits text with a regex before BPE ("pre-tokenization") and picks the regex by the file's
`tokenizer.ggml.pre` name. A wrong name makes llama.cpp and Ollama cut prompts into other tokens than training
used (ids fed directly, as the export's check feeds them, are not affected, so only the name can be checked).
llama.cpp's `convert_hf_to_gguf.py` (`get_vocab_base_pre`) names it from the hash of one fixed text's token ids;
the same text and hashes are used here, for the BPE tokenizers of decoder models it knows.
"""

from __future__ import annotations

from hashlib import sha256
from pathlib import Path

#: the text convert_hf_to_gguf.py tokenizes: whitespace runs, emoji, digits, scripts, quotes, contractions
CHECK_TEXT = ("\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 "
              "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
              "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
              "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL")

#: sha256 of str(token ids of CHECK_TEXT) -> llama.cpp's pre-tokenizer name (from convert_hf_to_gguf.py)
PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
    "877081d19cf6996e2c4ff0e1236341e9b7bde288f5311a56a937f0afbbb3aeb5": "deepseek-v3",
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "8aeee3860c56296a157a1fe2fad249ec40aa59b1bb5709f4ade11c4e6fe652ed": "falcon",
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166": "olmo",  # also MPT's: the same split
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",
    "32d85c31273f8019248f2559fed492d929ea28b17e51d81d3bb36fff23ca72b3": "stablelm2",
    "6221ad2852e85ce96f791f476e0b390cf9b474c9e3d1362f53a24a06dc8220ff": "refact",
    "9c2227e4dd922002fb81bde4fc02b0483ca4f12911410dee2255e4987644e3f8": "command-r",
    "a8594e3edff7c29c003940395316294b2c623e09894deebbc65f33f1515df79e": "dbrx",
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",
    "c7ea5862a53e4272c035c8238367063e2b270d51faa48c0f09e9d5b54746c360": "poro-chat",
    "7fc505bd3104ca1083b150b17d088b59534ede9bde81f0dd2090967d7fe52cee": "viking",
    "b53802fb28e26d645c3a310b34bfe07da813026ec7c7716883404d5e0f8b1901": "jais",
    "7b3e7548e4308f52a76e8229e4e6cc831195d0d1df43aed21ac6c93da05fec5f": "codeshell",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
    "3c30d3ad1d6b64202cd222813e7736c2db6e1bd6d67197090fc1211fbc612ae7": "bloom",
    "bc01ce58980e1db43859146dc51b1758b3b88729b217a74792e9f8d43e479d21": "gpt3-finnish",
    "4e2b24cc4770243d65a2c9ec19770a72f08cffc161adbb73fcbb6b7dd45a0aae": "exaone",
    "fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085": "phi-2",
    "60824e3c0d9401f89943cbb2fff727f0e2d4c545ba4df2d6e4f09a6db0f5b450": "chameleon",
    "ad851be1dba641f2e3711822f816db2c265f788b37c63b4e1aeacb9ee92de8eb": "gigachat",
    "d4c8f286ea6b520b3d495c4455483cfa2302c0cfcd4be05d781b6a8a0a7cdaf1": "megrez",
    "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e": "gpt-4o",
    "7dec86086fcc38b66b7bc1575a160ae21cf705be7718b9d5598190d7c12db76f": "superbpe",
    "1994ffd01900cfb37395608534236ecd63f2bd5995d6cb1004dda1af50240f15": "trillion",
    "96a5f08be6259352137b512d4157e333e21df7edd3fcd152990608735a65b224": "bailingmoe",
    "d353350c764d8c3b39c763113960e4fb4919bea5fbf208a0e3b22e8469dc7406": "llama4",
    "0e9433cbbb161f89e264eb32e8e64bfe69e834973ffca5d41d3948a604a3e2a3": "pixtral",
    "d5f1dd6f980fec569fb218a81a7658ac45fc56b38c5a0adeb1c232fbe04ef5ec": "seed-coder",
    "a1336059768a55c99a734006ffb02203cd450fed003e9a71886c88acf24fdbc2": "glm4",
    "1431a23e583c97432bc230bff598d103ddb5a1f89960c8f1d1051aaa944d0b35": "minerva-7b",
}
UNKNOWN = "default"  # what is written for a tokenizer not in the table: llama.cpp's generic split


def pre_tokenizer(tokenizer) -> str | None:
    """llama.cpp's name for `tokenizer`'s pre-tokenizer ("smollm", "llama-bpe", "qwen2", ...), None if unknown."""
    return PRE_TOKENIZERS.get(sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest())


def pre_tokenizer_note(tokenizer) -> str:
    """One line for the export report: the name written, or why text prompts may split differently."""
    name = pre_tokenizer(tokenizer)
    if name:
        return f"pre-tokenizer {name!r}: llama.cpp and Ollama split text as transformers does"
    return (f"WARNING: pre-tokenizer not recognized, {UNKNOWN!r} written: llama.cpp and Ollama may split text prompts "
            "into other tokens than training did; convert the %qlora_merge folder with llama.cpp's convert_hf_to_gguf.py")


def add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """A byte-level BPE tokenizer (tokens, merges, special ids, chat template), padded to the embedding's rows."""
    import tempfile

    import gguf

    from ..errors import ConfigError

    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        try:
            vocab = gguf.vocab.BpeVocab(Path(folder))
        except (FileNotFoundError, ValueError, KeyError) as error:
            raise ConfigError(f"GGUF export supports byte-level BPE tokenizers (tokenizer.json); this one is not: {error}") from None
        tokens, types = [], []
        for text, _score, kind in vocab.all_tokens():
            tokens.append(text)
            types.append(kind)
        special = gguf.SpecialVocab(Path(folder), load_merges=True, n_vocab=vocab_size)
        special_ids = set(tokenizer.all_special_ids)
        ids = tokenizer.get_vocab()
        types = [gguf.TokenType.CONTROL if ids.get(t.decode("utf-8", "replace") if isinstance(t, bytes) else t) in special_ids
                 else kind for t, kind in zip(tokens, types)]
        for i in range(len(tokens), vocab_size):  # embedding rows past the tokenizer's vocabulary
            tokens.append(f"[PAD{i}]".encode())
            types.append(gguf.TokenType.UNUSED)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre_tokenizer(tokenizer) or UNKNOWN)
        writer.add_token_list(tokens[:vocab_size])
        writer.add_token_types(types[:vocab_size])
        special.add_to_gguf(writer, quiet=True)
        # the tokenizer's own bos flag, so llama.cpp adds a bos exactly when transformers does
        writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
