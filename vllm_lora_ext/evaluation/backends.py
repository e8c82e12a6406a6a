"""Two ways to ask a model for option log-likelihoods and greedy generations, one interface.

``HttpBackend`` asks a running vLLM OpenAI-compatible server (``/v1/completions`` with token-id
prompts and ``prompt_logprobs``), so base, adapters and ``merge:`` specs are scored exactly as
users get them. ``TransformersBackend`` runs transformers (+ an optional PEFT adapter) in
process in float32, as a reference. Both take token ids and return the same structures, so their
outputs can be compared element by element.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import httpx

# (prompt ids, continuation ids): the continuation is scored given the prompt.
ScoreRequest = tuple[Sequence[int], Sequence[int]]
_T = TypeVar("_T")


@dataclass(frozen=True)
class Generation:
    token_ids: tuple[int, ...]
    """Generated ids, without the stop token that ended the generation (if one did)."""
    text: str


class Backend(Protocol):
    tokenizer: Any

    def continuation_logprobs(self, requests: Sequence[ScoreRequest]) -> list[tuple[float, ...]]:
        """Per request, the log-probability of each continuation token given what precedes it."""
        ...

    def continuation_top_logprobs(
        self, requests: Sequence[ScoreRequest], k: int
    ) -> list[tuple[dict[int, float], ...]]:
        """Per request and continuation token, the ``k`` most likely tokens at that position
        (given all before it) with their log-probabilities: a teacher's distributions."""
        ...

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_tokens: int,
        stop_token_ids: Sequence[int],
        temperature: float = 0.0,
        seed: int | None = None,
    ) -> list[Generation]:
        """Decoding of each prompt, up to ``max_tokens`` or a stop/EOS token: greedy at
        ``temperature`` 0, else sampled, reproducibly when ``seed`` is given (prompt ``i`` of the
        call is sampled with ``seed + i``, so equal prompts in one call still differ)."""
        ...


class BackendError(RuntimeError):
    pass


def _batches(items: Sequence[_T], size: int) -> Iterator[Sequence[_T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _check_requests(requests: Sequence[ScoreRequest]) -> None:
    if any(len(ctx) == 0 or len(cont) == 0 for ctx, cont in requests):
        raise ValueError("both the prompt and the continuation need at least one token")


class HttpBackend:
    """A vLLM server's ``/v1/completions``; ``model`` is the base name, an adapter or a merge."""

    def __init__(
        self,
        url: str,
        model: str,
        tokenizer: Any,
        batch_size: int = 32,
        timeout: float = 600.0,
        client: httpx.Client | None = None,
        headers: dict[str, str] | None = None,
        seeded: bool = True,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.seeded = seeded
        """False: samples ignore the seed and go in batched requests (not reproducible; on a
        busy server one request per prompt waits in line once per prompt)."""
        self.client = client or httpx.Client(base_url=url, timeout=timeout, headers=headers)

    def _complete(self, prompts: list[list[int]], **params: Any) -> list[dict]:
        body = {"model": self.model, "prompt": prompts, "temperature": 0.0, **params}
        response = self.client.post("/v1/completions", json=body)
        if response.status_code != 200:
            raise BackendError(f"/v1/completions answered {response.status_code}: {response.text}")
        choices = sorted(response.json()["choices"], key=lambda c: c["index"])
        if len(choices) != len(prompts):
            raise BackendError(f"sent {len(prompts)} prompts, got {len(choices)} choices")
        for prompt, choice in zip(prompts, choices, strict=True):
            if choice.get("prompt_token_ids") not in (None, prompt):
                raise BackendError("the server changed the prompt's token ids")
        return choices

    def continuation_logprobs(self, requests: Sequence[ScoreRequest]) -> list[tuple[float, ...]]:
        _check_requests(requests)
        out: list[tuple[float, ...]] = []
        for batch in _batches(requests, self.batch_size):
            seqs = [[*ctx, *cont] for ctx, cont in batch]
            # prompt_logprobs=0: the log-prob of each prompt token itself, nothing else. One
            # token is generated (vLLM needs at least one) and ignored.
            choices = self._complete(seqs, max_tokens=1, prompt_logprobs=0, return_token_ids=True)
            for (ctx, _), seq, choice in zip(batch, seqs, choices, strict=True):
                per_token = choice["prompt_logprobs"]
                out.append(
                    tuple(_logprob_of(per_token[i], seq[i]) for i in range(len(ctx), len(seq)))
                )
        return out

    def continuation_top_logprobs(
        self, requests: Sequence[ScoreRequest], k: int
    ) -> list[tuple[dict[int, float], ...]]:
        _check_requests(requests)
        out: list[tuple[dict[int, float], ...]] = []
        for batch in _batches(requests, self.batch_size):
            seqs = [[*ctx, *cont] for ctx, cont in batch]
            # prompt_logprobs=k: the top k at each prompt position, plus the prompt's own token
            # when it is not among them (its rank tells).
            choices = self._complete(seqs, max_tokens=1, prompt_logprobs=k, return_token_ids=True)
            for (ctx, _), seq, choice in zip(batch, seqs, choices, strict=True):
                per_token = choice["prompt_logprobs"]
                out.append(tuple(_top_of(per_token[i], k) for i in range(len(ctx), len(seq))))
        return out

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_tokens: int,
        stop_token_ids: Sequence[int],
        temperature: float = 0.0,
        seed: int | None = None,
    ) -> list[Generation]:
        stops = {*stop_token_ids, self.tokenizer.eos_token_id}
        seed = seed if self.seeded else None
        # vLLM applies a request's seed to every prompt of it: a seeded sample needs one request
        # per prompt to give each prompt its own seed.
        size = 1 if temperature > 0 and seed is not None else self.batch_size
        out: list[Generation] = []
        for start, batch in zip(range(0, len(prompts), size), _batches(prompts, size), strict=True):
            sampling: dict[str, Any] = {"temperature": temperature}
            if temperature > 0 and seed is not None:
                sampling["seed"] = seed + start
            choices = self._complete(
                [list(p) for p in batch],
                max_tokens=max_tokens,
                **sampling,
                stop_token_ids=list(stop_token_ids),
                return_token_ids=True,
                skip_special_tokens=True,
                # Explicit, so a generation_config.json cannot add penalties on the server only.
                repetition_penalty=1.0,
                presence_penalty=0.0,
                frequency_penalty=0.0,
            )
            for choice in choices:
                ids = list(choice["token_ids"])
                # vLLM keeps the EOS / stop token that ended the sequence in token_ids.
                if choice["finish_reason"] == "stop" and ids and ids[-1] in stops:
                    ids.pop()
                # Decode here, as the in-process path does: vLLM's incremental detokenizer
                # holds back a trailing incomplete UTF-8 sequence, tokenizer.decode does not.
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                out.append(Generation(tuple(ids), text))
        return out


def _top_of(position: dict | None, k: int) -> dict[int, float]:
    """The ``k`` entries of rank 1..k of one position of vLLM's prompt log-probs."""
    if position is None:
        raise BackendError("the server returned no log-probs for a scored token")
    top = {int(i): float(e["logprob"]) for i, e in position.items() if e["rank"] <= k}
    if len(top) < k:
        raise BackendError(f"the server returned {len(top)} of the top {k} log-probs")
    return top


def _logprob_of(position: dict | None, token_id: int) -> float:
    """vLLM's per-position ``{token_id: {"logprob", "rank", "decoded_token"}}`` (JSON keys)."""
    if position is None:
        raise BackendError("the server returned no log-prob for a scored token")
    entry = position.get(str(token_id), position.get(token_id))
    if entry is None:
        raise BackendError(f"token {token_id} missing from the server's prompt log-probs")
    return float(entry["logprob"])


class TransformersBackend:
    """transformers in process, float32, with an optional PEFT adapter: the reference path."""

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 8) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(
        cls, model_dir: Path | str, adapter_dir: Path | str | None = None, batch_size: int = 8
    ) -> TransformersBackend:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        if adapter_dir is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter_dir)
        return cls(model, AutoTokenizer.from_pretrained(model_dir), batch_size)

    def continuation_logprobs(self, requests: Sequence[ScoreRequest]) -> list[tuple[float, ...]]:
        import torch

        out: list[tuple[float, ...]] = []
        for seq, logprobs in self._continuations(requests):
            continuation = torch.tensor(seq[len(seq) - len(logprobs) :])
            out.append(tuple(logprobs.gather(-1, continuation[:, None]).squeeze(-1).tolist()))
        return out

    def continuation_top_logprobs(
        self, requests: Sequence[ScoreRequest], k: int
    ) -> list[tuple[dict[int, float], ...]]:
        out: list[tuple[dict[int, float], ...]] = []
        for _, logprobs in self._continuations(requests):
            values, ids = logprobs.topk(k, dim=-1)
            out.append(
                tuple(
                    dict(zip(i, v, strict=True))
                    for i, v in zip(ids.tolist(), values.tolist(), strict=True)
                )
            )
        return out

    def _continuations(self, requests: Sequence[ScoreRequest]) -> Iterator[tuple[list[int], Any]]:
        """Per request: its full sequence, and the log-softmax [len(continuation), vocab] of
        the positions that predict the continuation's tokens."""
        import torch

        _check_requests(requests)
        for batch in _batches(requests, self.batch_size):
            seqs = [[*ctx, *cont] for ctx, cont in batch]
            width = max(map(len, seqs))
            # Right padding: causal attention keeps every real position unaffected by it.
            ids = torch.zeros(len(seqs), width, dtype=torch.long)
            mask = torch.zeros(len(seqs), width, dtype=torch.long)
            for row, seq in enumerate(seqs):
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
            # Logits only from the shortest prompt's last position on (position p predicts token
            # p + 1): the prompt positions are not scored, and with a large vocabulary the
            # output projection is most of the forward pass.
            first = min(len(ctx) for ctx, _ in batch)
            keep = torch.arange(first - 1, width - 1)
            with torch.inference_mode():
                logits = self.model(
                    input_ids=ids, attention_mask=mask, logits_to_keep=keep
                ).logits.float()
            logprobs = torch.log_softmax(logits, dim=-1)
            for row, ((ctx, _), seq) in enumerate(zip(batch, seqs, strict=True)):
                yield seq, logprobs[row, len(ctx) - first : len(seq) - first]

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_tokens: int,
        stop_token_ids: Sequence[int],
        temperature: float = 0.0,
        seed: int | None = None,
    ) -> list[Generation]:
        """Plain argmax (or a temperature sample) with a KV cache, one prompt at a time: no
        padding, no logits processors from ``generation_config`` (vLLM gets explicit neutral
        penalties to match). Samples come from a ``torch.Generator`` seeded per prompt."""
        import torch

        stops = set(stop_token_ids) | self._eos_ids()
        out: list[Generation] = []
        for index, prompt in enumerate(prompts):
            generator = None
            if temperature > 0:
                generator = torch.Generator()
                if seed is None:
                    generator.seed()
                else:
                    generator.manual_seed(seed + index)
            generated: list[int] = []
            with torch.inference_mode():
                # logits_to_keep=1: only the last position's logits are used.
                step = self.model(
                    input_ids=torch.tensor([list(prompt)]), use_cache=True, logits_to_keep=1
                )
                while max_tokens > 0:
                    token = _next_token(step.logits[0, -1], temperature, generator)
                    if token in stops:
                        break
                    generated.append(token)
                    if len(generated) >= max_tokens:
                        break
                    step = self.model(
                        input_ids=torch.tensor([[token]]),
                        past_key_values=step.past_key_values,
                        use_cache=True,
                    )
            text = self.tokenizer.decode(generated, skip_special_tokens=True)
            out.append(Generation(tuple(generated), text))
        return out

    def _eos_ids(self) -> set[int]:
        """EOS ids vLLM also stops on: the tokenizer's and the generation config's."""
        ids = {self.tokenizer.eos_token_id} - {None}
        config = getattr(self.model, "generation_config", None)
        eos = getattr(config, "eos_token_id", None)
        ids |= set(eos) if isinstance(eos, list) else {eos} - {None}
        return ids


def _next_token(logits: Any, temperature: float, generator: Any) -> int:
    """Argmax at temperature 0, else one draw from ``softmax(logits / temperature)``."""
    import torch

    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
