"""``ponder.backends.openai``: a model behind any OpenAI-compatible completions server (vLLM,
SGLang, llama.cpp, Ollama, ``transformers serve``, a hosted API, ``ponder serve``)
as a ``TextLM``, or a ``LogprobsLM`` where the server gives top-k log-probabilities
and scores prompts.

What a server can do is found by probing it at construction, not by trusting the
request: ``transformers serve`` accepts ``logprobs`` and ``n`` and silently ignores
both, so a client that believed them would vote over one sample or score by nothing.
The probes are tiny completions: plain, with ``n``, with ``logprobs``, with
``echo`` (prompt scoring), with vLLM's token-id extensions, and three seeds at a
high temperature (``transformers serve`` decodes greedily whatever the temperature
unless a ``generation_config`` field asks it to sample; the probe finds which).

Scale-out and faults:

* several base URLs are replicas; each request goes to the one with the fewest
  requests outstanding (least-outstanding-requests), skipping one that failed in
  the last seconds;
* a request that meets 429, 5xx, a timeout, a dropped connection or malformed JSON is
  retried on another replica, with exponential backoff and jitter (``tenacity``),
  honouring ``Retry-After``; retries are bounded by count and by time, and a request
  that still fails raises ``BackendError`` naming the server and every error;
* each result slot is filled by exactly one response, so nothing is lost or counted
  twice (a retried request's abandoned attempt is never read);
* ``n`` goes to the server where it honours it and no seed is set (vLLM draws all n
  samples from one seed: n copies), else (or for what it returned short) k parallel
  requests with seeds ``seed + i``: the failure of many meta-generation
  proxies (optillm issues #8 and #99).

A base URL ending in ``/chat/completions`` (or ``chat=True``) sends each prompt as one
user message to the chat endpoint, for hosted APIs that have no other; the server's
chat template renders it, and the level is text (no prompt scoring there).

Usage is read from the server's responses; where a server gives none, ponder counts
with the model's tokenizer if it has one (``tokenizer=``), and each generation's
``meta["usage_counted_by"]`` says whose count it is.
"""

from .lm import OpenAILM
from .responses import load_tokenizer
from .transport import RETRY_STATUS, Replica, SharedClock, Transport, parse_endpoint

__all__ = ["OpenAILM", "Replica", "RETRY_STATUS", "SharedClock", "Transport", "load_tokenizer", "parse_endpoint"]
