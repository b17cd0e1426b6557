"""Special tokens, the demo tokenizer trainer and tokenizer loading (always from a local path)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from lit_bluelm.errors import ConfigError

PAD = "<|pad|>"
EOS = "<|endoftext|>"
IMAGE = "<image>"  # one marker per image; the processor expands it to the image's token count
THINK_CONTROL = "[|BlueThink|]"  # thinking-mode control token, placed after the user query
THINK_START = "<think>"
THINK_END = "</think>"
IM_START = "<|im_start|>"  # chat turns: <|im_start|>role\n ... <|im_end|>
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [PAD, EOS, IMAGE, THINK_CONTROL, THINK_START, THINK_END, IM_START, IM_END]


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer and save it as a Hugging Face tokenizer directory. Numbers
    are split into single digits (one token each), so arithmetic is learnable digit by digit."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,  # ids 0..7, never split by BPE
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in (PAD, EOS)],
        model_max_length=1 << 20,
    )
    from lit_bluelm.chat import chat_template  # chat imports this module's token names

    fast.chat_template = chat_template()
    fast.save_pretrained(str(out_dir))
    return fast


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """A Hugging Face tokenizer from a local directory; it must know every special token we use."""
    if not Path(path).is_dir():
        raise ConfigError(f"tokenizer.path: '{path}' is not a tokenizer directory")
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    vocab = tok.get_vocab()
    missing = [t for t in SPECIAL_TOKENS if t not in vocab and t != PAD]
    if missing:
        raise ConfigError(f"tokenizer.path '{path}' lacks special tokens {missing}")
    if tok.pad_token is None:  # many released tokenizers have none: pad with EOS (labels mask it)
        tok.pad_token = tok.eos_token
    return tok


def tokenizer_difference(theirs: PreTrainedTokenizerBase, ours: PreTrainedTokenizerBase) -> Optional[str]:
    """How two tokenizers map tokens to ids differently (a phrase for an error message), or None
    when they agree on every (token, id) pair."""
    a, b = theirs.get_vocab(), ours.get_vocab()
    if a == b:
        return None
    differ = sorted(set(a.items()) ^ set(b.items()), key=lambda kv: kv[1])
    return f"{len(a)} vs {len(b)} tokens, {len(differ)} (token, id) pairs differ, e.g. {differ[0]!r}"
