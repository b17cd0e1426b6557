"""Generate a reply with a trained run.

    python -m lit_bluelm.generate ckpt=<ckpt> prompt="..." [image=path] [think=true]
        [thinking_budget=64] [temperature=0] [top_p=1] [top_k=0] [seed=0] [max_new_tokens=256]
        [max_answer_tokens=null] [thinking_end_text="..."] [stop=[...]] [system="..."]
        [device=cpu] [json=true]

Prints the answer (the text after the think block); ``json=true`` prints one JSON line with
``text``, ``thinking``, ``answer``, ``thinking_tokens``, ``answer_tokens``, ``budget_exhausted``
and ``finish_reason``. The checkpoint is read with ``load_run``: its saved config builds the
model, its run's tokenizer and chat template build the prompt (``think=true`` adds the control
token; the model itself opens ``<think>``). Bad input (a path that is not a checkpoint, an image
that cannot be decoded, a prompt longer than the context, a negative budget, an unknown key) is
one line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence

from omegaconf import OmegaConf

from lit_bluelm.cli import parse_key_values, run_main
from lit_bluelm.errors import ConfigError
from lit_bluelm.generation import DEFAULT_THINKING_END, GenerationConfig


@dataclass
class GenerateArgs:
    ckpt: Optional[str] = None
    prompt: Optional[str] = None
    image: Optional[str] = None
    system: Optional[str] = None
    think: bool = False
    thinking_budget: Optional[int] = None
    thinking_end_text: str = DEFAULT_THINKING_END
    max_answer_tokens: Optional[int] = None
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    max_new_tokens: int = 256
    stop: List[str] = field(default_factory=list)
    device: str = "cpu"
    json: bool = False
    # given, it must equal the checkpoint's (a model is generated with the context it was trained with)
    context: Optional[Any] = None

    def generation(self) -> GenerationConfig:
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            stop=tuple(self.stop),
            thinking_budget=self.thinking_budget,
            thinking_end_text=self.thinking_end_text,
            max_answer_tokens=self.max_answer_tokens,
        )


# free text, taken as written (a prompt like "Colour: red?" is not YAML)
TEXT_KEYS = ("ckpt", "prompt", "image", "system", "thinking_end_text", "device")


def parse_args(argv: Sequence[str]) -> GenerateArgs:
    args = parse_key_values(GenerateArgs, argv, TEXT_KEYS)
    if not args.ckpt:
        raise ConfigError("ckpt=<checkpoint> is required")
    if args.prompt is None:
        raise ConfigError('prompt="..." is required')
    args.generation().check()
    return args


def check_context(requested: Any, saved: Any) -> None:
    """A model is generated with the context (RoPE scaling) its checkpoint was trained with."""
    if requested is None:
        return
    want = OmegaConf.to_container(OmegaConf.create({"context": requested}))["context"]
    have = OmegaConf.to_container(saved, resolve=True)
    if want != have:
        raise ConfigError(
            f"context: {want} differs from the checkpoint's {have}; generate with the checkpoint's"
        )


def run(args: GenerateArgs) -> dict:
    from lit_bluelm.checkpoint import load_run
    from lit_bluelm.generation import Generator, build_prompt
    from lit_bluelm.processor import BlueLMProcessor, load_image

    image = load_image(args.image) if args.image else None  # before the checkpoint: fail fast
    loaded = load_run(args.ckpt, key="ckpt")
    check_context(args.context, loaded.config.context)
    cfg = loaded.config
    if image is not None and cfg.model.text_only:
        raise ConfigError(f"image: '{args.ckpt}' is a text-only model")
    processor = BlueLMProcessor.from_config(loaded.tokenizer, cfg.model, cfg.sft.think_token_position)
    prompt = build_prompt(
        processor, args.prompt, [image] if image else [], think=args.think, system=args.system
    )
    generator = Generator(loaded.model.to(args.device), loaded.tokenizer)
    out = generator.generate([prompt], args.generation())[0]
    return {
        "text": out.text,
        "thinking": out.thinking,
        "answer": out.answer,
        "thinking_tokens": out.thinking_tokens,
        "answer_tokens": out.answer_tokens,
        "budget_exhausted": out.budget_exhausted,
        "finish_reason": out.finish_reason,
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    def body(argv: list) -> None:
        args = parse_args(argv)
        result = run(args)
        print(json.dumps(result) if args.json else result["answer"], flush=True)

    return run_main(body, lambda: __doc__.strip(), argv)


if __name__ == "__main__":
    sys.exit(main())
