"""The generation engine: batched, KV-cached decoding over the composed model (plain PyTorch, no
Lightning), with an exact thinking-token budget. Evaluation and GRPO rollouts use it.

* Prompts are token ids (+ the AnyRes tiles of their images, see :func:`build_prompt`), left-padded
  into one batch with position ids as transformers computes them (``cumsum(mask) - 1``).
* Greedy (``temperature=0``) or sampled with temperature, top-k and top-p, from a seeded
  generator: the same seed, prompts and settings give the same output. Logits of padded
  vocabulary rows (an LLM vocabulary larger than the tokenizer) and of the ``<image>``
  placeholder (it stands for image features a reply never has) are never chosen.
* A row stops at EOS or ``<|im_end|>`` (the stop token ends its ids but not its text), at a user
  stop string (the text ends before it), or after ``max_new_tokens`` (``finish_reason`` ``stop``
  or ``length``).

**The thinking budget.** The block the budget counts is the one the reply opens with: a
``<think>`` the model writes before any other token. Think blocks in the prompt (earlier turns)
are never counted. Inside the block, every token the model chooses counts (a second ``<think>``
too: it does not restart the count), until the model closes the block with ``</think>``. When
``thinking_budget`` tokens have been chosen and the block is still open, the engine forces
``thinking_end_text`` + ``</think>\\n`` token by token, marked in ``forced``; forced tokens are not
thinking tokens. Budget 0 closes the block right after ``<think>``. After the block is closed
(by the model or by force) the reply is its answer: a later ``<think>`` or ``</think>`` opens or
closes nothing, and ``max_answer_tokens`` caps the model's answer tokens.

Each token has a log-prob: of a sampled token, under the distribution it was drawn from (after
temperature, top-k and top-p); of a greedy token, under the model's softmax; of a forced token,
under the temperature-scaled softmax without top-k/top-p (so it is finite).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch
from PIL import Image

from lit_bluelm.chat import render_chat, split_reply
from lit_bluelm.errors import ConfigError
from lit_bluelm.fast_decode import FastDecoder
from lit_bluelm.processor import BlueLMProcessor
from lit_bluelm.tokenizer import IM_END, THINK_END, THINK_START

DEFAULT_THINKING_END = "\n\nI have to answer now.\n"
FINISH_REASONS = ("stop", "length")


@dataclass
class GenerationConfig:
    """How to decode (shared by the CLI, evaluation and rollouts)."""

    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int = 0
    stop: Tuple[str, ...] = ()  # stop strings (the text ends before the first one)
    thinking_budget: Optional[int] = None  # None: no limit
    thinking_end_text: str = DEFAULT_THINKING_END  # forced, then </think>\n, when the budget is spent
    max_answer_tokens: Optional[int] = None  # None: only max_new_tokens
    ignore_eos: bool = False  # never stop at EOS / <|im_end|> (benchmarks: exactly max_new_tokens)

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
        if self.thinking_budget is not None and self.thinking_budget < 0:
            raise ConfigError(
                f"thinking_budget must be >= 0 (or null for no limit), got {self.thinking_budget}"
            )
        if self.max_answer_tokens is not None and self.max_answer_tokens < 1:
            raise ConfigError(f"max_answer_tokens must be >= 1, got {self.max_answer_tokens}")
        if any(not s for s in self.stop):
            raise ConfigError("stop strings must not be empty")


@dataclass
class Prompt:
    """One prompt as model input: token ids with expanded image placeholders, and their tiles."""

    input_ids: List[int]
    pixel_values: Optional[torch.Tensor] = None


@dataclass
class Generation:
    """One generated reply."""

    text: str  # the reply as decoded (special tokens kept, stop token and stop string left out)
    token_ids: List[int]  # every generated id, forced ones and the stop token included
    logprobs: List[float]  # one per id (see the module docstring)
    forced: List[bool]  # one per id: forced by the thinking budget
    finish_reason: str  # "stop" or "length"
    thinking_tokens: int = 0  # model-chosen tokens inside the think block
    answer_tokens: int = 0  # model-chosen tokens after it (or of the whole reply without one)
    budget_exhausted: bool = False
    thinking: Optional[str] = None  # text inside the think block (forced text included), or None
    answer: str = ""  # text after the think block (the whole reply without one)


def build_prompt(
    processor: BlueLMProcessor,
    prompt: str,
    images: Sequence[Image.Image] = (),
    think: bool = False,
    system: Optional[str] = None,
) -> Prompt:
    """A single-turn chat prompt in the chat format (the run's control-token placement), ready
    for the assistant's reply. Without an ``<image>`` marker in ``prompt``, images go first, one
    marker a line (the layout of the demo's conversations)."""
    from lit_bluelm.tokenizer import IMAGE

    content = prompt if IMAGE in prompt or not images else "".join(f"{IMAGE}\n" for _ in images) + prompt
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": content}
    ]
    text = render_chat(
        messages, enable_thinking=think, think_position=processor.think_position, add_generation_prompt=True
    )
    try:
        encoded = processor.encode(text, list(images))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return Prompt(encoded.input_ids, encoded.pixel_values)


class _Row:
    """One row's budget state machine and outputs."""

    def __init__(self, cfg: GenerationConfig, ids: _Ids) -> None:
        self.cfg, self.t = cfg, ids
        self.phase = "open"  # open (nothing yet) -> think (inside the block) -> answer
        self.thinking = self.answer = 0
        self.queue: List[int] = []
        self.exhausted = False
        self.token_ids: List[int] = []
        self.logprobs: List[float] = []
        self.forced: List[bool] = []
        self.finish: Optional[str] = None
        self.cut: Optional[int] = None  # character offset of a stop string in the text

    def next_forced(self) -> Optional[int]:
        budget = self.cfg.thinking_budget
        if not self.queue and self.phase == "think" and budget is not None and self.thinking >= budget:
            self.queue = list(self.t.end_sequence)
            self.exhausted = True
        return self.queue.pop(0) if self.queue else None

    def add(self, token: int, logprob: float, forced: bool) -> None:
        self.token_ids.append(token)
        self.logprobs.append(logprob)
        self.forced.append(forced)
        if not forced and token in self.t.stops and not self.cfg.ignore_eos:
            self.finish = "stop"  # the stop token is neither thinking nor answer
            return
        if forced:
            if token == self.t.think_end:
                self.phase = "answer"
        elif self.phase == "open":
            if token == self.t.think_start:
                self.phase = "think"
            else:
                self.phase, self.answer = "answer", 1
        elif self.phase == "think":
            if token == self.t.think_end:
                self.phase = "answer"
            else:
                self.thinking += 1
        else:
            self.answer += 1
        if len(self.token_ids) >= self.cfg.max_new_tokens:
            self.finish = "length"
        elif self.cfg.max_answer_tokens is not None and self.answer >= self.cfg.max_answer_tokens:
            self.finish = "length"


@dataclass
class _Ids:
    think_start: int
    think_end: int
    stops: frozenset
    end_sequence: List[int] = field(default_factory=list)


def _cache_kwarg(base_model: torch.nn.Module) -> str:
    """The KV-cache argument of the decoder's forward (``cache`` in newer transformers)."""
    params = inspect.signature(base_model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def choose(
    logits: torch.Tensor, cfg: GenerationConfig, generator: Optional[torch.Generator]
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next tokens [B], their log-probs [B] (see the module docstring), and the log-softmax a
    forced token is scored by [B, V]. ``logits`` [B, V] float32, padded rows already -inf."""
    if cfg.temperature == 0:
        logp = torch.log_softmax(logits, dim=-1)
        tokens = logits.argmax(dim=-1)
        return tokens, logp.gather(1, tokens[:, None])[:, 0], logp
    scaled = logits / cfg.temperature
    plain = torch.log_softmax(scaled, dim=-1)
    filtered = scaled
    if cfg.top_k > 0 and cfg.top_k < filtered.shape[-1]:
        kth = torch.topk(filtered, cfg.top_k, dim=-1).values[:, -1:]
        filtered = filtered.masked_fill(filtered < kth, float("-inf"))
    if cfg.top_p < 1:
        sorted_logits, order = torch.sort(filtered, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens before it already reach top_p (the first always stays)
        drop = (probs.cumsum(-1) - probs) >= cfg.top_p
        filtered = filtered.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    logp = torch.log_softmax(filtered, dim=-1)
    tokens = torch.multinomial(logp.exp(), 1, generator=generator)[:, 0]
    return tokens, logp.gather(1, tokens[:, None])[:, 0], plain


class Generator:
    """Decodes batches of prompts with ``model`` (a :class:`~lit_bluelm.models.BlueLM`)."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        max_length: Optional[int] = None,
        fast: bool = True,
        lockstep: bool = False,
    ) -> None:
        """``lockstep``: every rank of the process group decodes until the last row of every
        rank has finished (a sharded model's forward is a collective: a rank that stopped early
        would leave the others waiting); it needs ``fast=False`` (the direct decode step reads
        whole weights)."""
        if lockstep and fast:
            raise ValueError("lockstep decoding runs the model's own forward: pass fast=False")
        self.model = model
        self.lockstep = lockstep
        self.tokenizer = tokenizer
        llm_cfg = model.llm.config
        self.max_length = max_length or int(getattr(llm_cfg, "max_position_embeddings", 1 << 30))
        self.vocab_limit = len(tokenizer)  # ids at and above it are padded rows: never chosen
        image_id = getattr(model, "image_token_id", None)
        self.banned = [int(image_id)] if image_id is not None and 0 <= image_id < self.vocab_limit else []
        self.cache_kwarg = _cache_kwarg(model.llm.base_model)
        # the direct decode step for Llama-style decoders (fast=False: the model's forward always)
        self.fast = fast and FastDecoder.supports(model.llm.base_model)
        convert = tokenizer.convert_tokens_to_ids
        stops = {i for i in (tokenizer.eos_token_id, convert(IM_END)) if i is not None}
        self.ids = _Ids(convert(THINK_START), convert(THINK_END), frozenset(stops))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def end_sequence(self, cfg: GenerationConfig) -> List[int]:
        return self.tokenizer(cfg.thinking_end_text + THINK_END + "\n", add_special_tokens=False)["input_ids"]

    def generate(
        self, prompts: Sequence[Prompt], cfg: GenerationConfig = GenerationConfig()
    ) -> List[Generation]:
        """One :class:`Generation` per prompt, in order (the model runs in eval mode without
        gradients; its training mode is restored afterwards)."""
        cfg.check()
        training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                return self._generate(prompts, cfg)
        finally:
            self.model.train(training)

    def _generate(self, prompts: Sequence[Prompt], cfg: GenerationConfig) -> List[Generation]:
        if not prompts:
            return []
        longest = max(len(p.input_ids) for p in prompts)
        if longest + cfg.max_new_tokens > self.max_length:
            raise ConfigError(
                f"a prompt of {longest} tokens + max_new_tokens={cfg.max_new_tokens} exceeds the "
                f"model's context of {self.max_length} tokens"
            )
        device = next(self.model.parameters()).device
        ids = _Ids(self.ids.think_start, self.ids.think_end, self.ids.stops, self.end_sequence(cfg))
        rows = [_Row(cfg, ids) for _ in prompts]
        batch = len(prompts)
        input_ids = torch.full((batch, longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((batch, longest), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding
            input_ids[i, longest - len(p.input_ids) :] = torch.tensor(p.input_ids, dtype=torch.long)
            mask[i, longest - len(p.input_ids) :] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        tiles = [p.pixel_values for p in prompts if p.pixel_values is not None]
        pixel_values = torch.cat(tiles).to(device) if tiles else None
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as transformers does
        generator = None
        if cfg.temperature > 0:
            generator = torch.Generator(device=device)
            generator.manual_seed(cfg.seed)

        from transformers import DynamicCache

        llm = self.model.llm
        base, head, embed = llm.base_model, self.model.output_head(), llm.get_input_embeddings()
        cache = DynamicCache(config=llm.config)
        fast = FastDecoder(base, batch, longest + cfg.max_new_tokens) if self.fast else None
        inputs = self.model.embed(input_ids, pixel_values)
        position_ids = positions
        next_pos = positions[:, -1:] + 1
        active = list(range(batch))
        while True:  # until no row decodes (here, or in lockstep on any rank)
            if fast is not None and fast.length:
                hidden = fast.step(inputs, position_ids, mask.bool())
            else:
                out = base(
                    inputs_embeds=inputs,
                    attention_mask=mask,
                    position_ids=position_ids,
                    use_cache=True,
                    **{self.cache_kwarg: cache},
                )
                hidden = out.last_hidden_state[:, -1]
                if fast is not None:
                    fast.load(cache, longest)
                    cache = None
            logits = head(hidden).float()
            logits[:, self.vocab_limit :] = float("-inf")
            if self.banned:
                logits[:, self.banned] = float("-inf")
            tokens, logprobs, plain = choose(logits, cfg, generator)
            tokens_list, logprobs_list = tokens.tolist(), logprobs.tolist()
            for i in active:
                row = rows[i]
                forced = row.next_forced()
                if forced is None:
                    row.add(tokens_list[i], logprobs_list[i], False)
                else:
                    tokens_list[i] = forced
                    row.add(forced, float(plain[i, forced]), True)
                if cfg.stop and row.finish is None:
                    self._check_stop_strings(row, cfg)
            active = [i for i in active if rows[i].finish is None]
            if not self._any_active(bool(active), device):
                break
            step = torch.tensor(tokens_list, dtype=torch.long, device=device)[:, None]
            inputs = embed(step)
            mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
            position_ids = next_pos
            next_pos = next_pos + 1
        return [self._result(row) for row in rows]

    def _any_active(self, local: bool, device: torch.device) -> bool:
        """Whether a row is still decoding here or, in lockstep, on any rank."""
        if not self.lockstep or not torch.distributed.is_initialized():
            return local
        flag = torch.tensor([1.0 if local else 0.0], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def _check_stop_strings(self, row: _Row, cfg: GenerationConfig) -> None:
        text = self.tokenizer.decode(row.token_ids, skip_special_tokens=False)
        hits = [text.find(s) for s in cfg.stop if s in text]
        if hits:
            row.cut, row.finish = min(hits), "stop"

    def _result(self, row: _Row) -> Generation:
        ids = row.token_ids
        if row.finish == "stop" and row.cut is None and ids and ids[-1] in self.ids.stops:
            ids = ids[:-1]  # the stop token ends the ids, not the text
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        if row.cut is not None:
            text = text[: row.cut]
        thinking, answer = split_reply(text)
        return Generation(
            text=text,
            token_ids=row.token_ids,
            logprobs=row.logprobs,
            forced=row.forced,
            finish_reason=row.finish or "length",
            thinking_tokens=row.thinking,
            answer_tokens=row.answer,
            budget_exhausted=row.exhausted,
            thinking=thinking,
            answer=answer,
        )
