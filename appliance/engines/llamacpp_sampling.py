"""How the llama.cpp engine picks each request's next token, on its worker thread.

A request that asks for temperature, top_p and seed only is sampled by llama.cpp's own sampler
chain, as fast as llama.cpp goes. Anything more (a grammar, logprobs, logit bias, min_tokens,
penalties) is done here over the position's logits in numpy, in vLLM's order so that a request
means the same on both engines (engines/base.py `GenerationRequest`):

    grammar mask -> logprobs reported -> logit bias, min_tokens -> repetition, frequency and
    presence penalties -> greedy, or temperature, top_p and a draw from the request's own seed

The grammar is an llguidance matcher built over the model's own vocabulary
(engines/llamacpp_grammar.py); it is advanced by every token chosen.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from .base import GenerationRequest, TokenLogprob

GREEDY_BELOW = 1e-5  # a temperature under this is greedy, as vLLM treats it


class TokenSampler(Protocol):
    def sample(self, ctx: Any, index: int) -> tuple[int, TokenLogprob | None]:
        """The next token from the logits at batch position `index`, and its logprob entry if
        the request asked for logprobs."""
        ...

    def free(self) -> None: ...


class ChainSampler:
    """llama.cpp's own sampler chain: greedy, or temperature, nucleus and a seeded draw."""

    def __init__(self, lib: Any, request: GenerationRequest):
        self._lib = lib
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        if request.temperature < GREEDY_BELOW:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
        else:
            # vLLM's order: temperature first, then nucleus, then draw.
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(request.temperature))
            if request.top_p < 1.0:
                lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(request.top_p, 1))
            seed = request.seed if request.seed is not None else lib.LLAMA_DEFAULT_SEED
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        self._chain = chain

    def sample(self, ctx: Any, index: int) -> tuple[int, TokenLogprob | None]:
        return int(self._lib.llama_sampler_sample(self._chain, ctx, index)), None

    def free(self) -> None:
        if self._chain is not None:
            self._lib.llama_sampler_free(self._chain)
            self._chain = None


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - np.max(logits)
    return shifted - np.log(np.sum(np.exp(shifted)))


class LogitsSampler:
    """vLLM's sampling steps over one position's logits, for one request."""

    def __init__(self, lib: Any, request: GenerationRequest, n_vocab: int, matcher: Any = None):
        self._lib, self.request, self.n_vocab, self.matcher = lib, request, n_vocab, matcher
        self._rng = np.random.default_rng(None if request.seed is None else request.seed % (1 << 64))
        self._bias: np.ndarray | None = None
        if request.logit_bias:
            self._bias = np.zeros(n_vocab, dtype=np.float32)
            for token, bias in request.logit_bias:
                self._bias[token] = bias
        # The repetition penalty counts the prompt too; presence and frequency the output only.
        self._seen = np.zeros(n_vocab, dtype=bool)
        self._seen[np.asarray(request.prompt_token_ids)] = True
        self._counts = np.zeros(n_vocab, dtype=np.int32)
        self._stops = np.asarray([t for t in request.stop_token_ids if 0 <= t < n_vocab], dtype=np.int64)
        self._generated = 0
        self._bitmask: np.ndarray | None = None
        if matcher is not None:
            from llguidance.numpy import allocate_token_bitmask

            self._bitmask = allocate_token_bitmask(1, n_vocab)

    def sample(self, ctx: Any, index: int) -> tuple[int, TokenLogprob | None]:
        pointer = self._lib.llama_get_logits_ith(ctx, index)
        logits = np.ctypeslib.as_array(pointer, shape=(self.n_vocab,)).astype(np.float32)  # a copy
        request = self.request
        if self.matcher is not None:
            logits[~self._allowed()] = -np.inf
        logprobs = log_softmax(logits) if request.logprobs is not None else None
        if self._bias is not None:
            logits += self._bias
        if self._generated < request.min_tokens and self._stops.size:
            logits[self._stops] = -np.inf
        self._penalise(logits)
        token = self._choose(logits)
        self._generated += 1
        self._seen[token] = True
        self._counts[token] += 1
        if self.matcher is not None:
            self.matcher.consume_token(token)  # a token it refuses leaves it allowing only EOS
        return token, self._entry(token, logprobs) if logprobs is not None else None

    def _allowed(self) -> np.ndarray:
        from llguidance.numpy import fill_next_token_bitmask

        assert self._bitmask is not None
        fill_next_token_bitmask(self.matcher, self._bitmask)
        bits = np.unpackbits(self._bitmask.view(np.uint8), bitorder="little")
        return bits[: self.n_vocab].astype(bool)

    def _penalise(self, logits: np.ndarray) -> None:
        request = self.request
        if request.repetition_penalty != 1.0:
            seen = logits[self._seen]
            logits[self._seen] = np.where(
                seen > 0, seen / request.repetition_penalty, seen * request.repetition_penalty
            )
        if request.frequency_penalty:
            logits -= request.frequency_penalty * self._counts
        if request.presence_penalty:
            logits -= request.presence_penalty * (self._counts > 0)

    def _choose(self, logits: np.ndarray) -> int:
        request = self.request
        if request.temperature < GREEDY_BELOW:
            return int(np.argmax(logits))
        probabilities = np.exp(log_softmax(logits / request.temperature))
        if request.top_p < 1.0:
            order = np.argsort(-probabilities, kind="stable")
            cumulative = np.cumsum(probabilities[order])
            # The smallest set of the most likely tokens whose mass reaches top_p (at least one).
            keep = order[: int(np.searchsorted(cumulative, request.top_p)) + 1]
            kept = np.zeros_like(probabilities)
            kept[keep] = probabilities[keep]
            probabilities = kept / kept.sum()
        return int(self._rng.choice(self.n_vocab, p=probabilities))

    def _entry(self, token: int, logprobs: np.ndarray) -> TokenLogprob:
        k = self.request.logprobs or 0
        top: tuple[tuple[int, float], ...] = ()
        if k:
            best = np.argpartition(-logprobs, min(k, self.n_vocab - 1))[:k]
            best = best[np.argsort(-logprobs[best], kind="stable")]
            top = tuple((int(t), float(logprobs[t])) for t in best)
        return TokenLogprob(token, float(logprobs[token]), top)

    def free(self) -> None:
        pass


def sampler_for(lib: Any, request: GenerationRequest, n_vocab: int, matcher: Any = None) -> TokenSampler:
    if request.plain:
        return ChainSampler(lib, request)
    return LogitsSampler(lib, request, n_vocab, matcher)
