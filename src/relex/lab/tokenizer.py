"""Character-level tokenizer built offline with `tokenizers`, wrapped as a `PreTrainedTokenizerFast`.

One token per character plus <pad>/<bos>/<eos>/<unk>; every encoding starts with <bos> so a prompt
and its training sequence share the same prefix. Saved with the model, the folder is a complete HF
model folder that `AutoTokenizer` loads without network access.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")


def build_tokenizer(alphabet: str) -> PreTrainedTokenizerFast:
    """A character tokenizer over ``alphabet`` (ids: specials first, then characters in order)."""
    chars = list(dict.fromkeys(alphabet))
    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *chars])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="left",
        model_max_length=64,
    )
