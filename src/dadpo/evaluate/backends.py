"""Judge backends: an OpenAI-compatible chat-completions endpoint over HTTP, or a local HF chat model
that reads its verdict from next-token log-probs (no sampling). Both fill a `VerdictCache` as they go,
so finished judgements survive a crash or an unreachable endpoint."""

from __future__ import annotations

import http.client
import json
import logging
import os
import random
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import torch
from tqdm.auto import tqdm

from dadpo.errors import DadpoError
from dadpo.evaluate.config import JudgeConfig
from dadpo.evaluate.judge import VERDICTS, PairItem, VerdictCache, cache_key, judge_messages, parse_verdict

log = logging.getLogger(__name__)


#: the endpoint settings' defaults are JudgeConfig's (one definition per setting)
_DEFAULTS = JudgeConfig(kind="openai")

class Judge:
    """Base: `judge(items, cache)` returns one cached row per item: {key, verdict (A/B/C or None), ...}.

    `id` names the judge in reports; `cache_id` keys its verdicts (by default the same)."""

    id: str

    @property
    def cache_id(self) -> str:
        return self.id

    def judge(self, items: list[PairItem], cache: VerdictCache, progress: bool = True) -> list[dict]:
        prompts = [judge_messages(it) for it in items]
        keys = [cache_key(self.cache_id, p) for p in prompts]
        todo = sorted({k: p for k, p in zip(keys, prompts, strict=True) if self._redo(cache.get(k))}.items())
        if todo:
            self._run(todo, cache, progress)
        return [{**cache.get(k), "item": it.key} for k, it in zip(keys, items, strict=True)]

    def _redo(self, cached: dict | None) -> bool:
        """Whether a prompt must be judged (again): by default only when nothing is cached."""
        return cached is None

    def _run(self, todo: list[tuple[str, list[dict]]], cache: VerdictCache, progress: bool) -> None:
        raise NotImplementedError


class OpenAIJudge(Judge):
    """Any OpenAI-compatible `/chat/completions` endpoint (OpenAI, vLLM, `dadpo.evaluate.serve`, ...)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = "OPENAI_API_KEY",
        *,
        concurrency: int = _DEFAULTS.concurrency,
        retries: int = _DEFAULTS.retries,
        timeout: float = _DEFAULTS.timeout,
        backoff: float = _DEFAULTS.backoff,
        max_tokens: int = _DEFAULTS.max_tokens,
    ):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.concurrency, self.retries = model, concurrency, retries
        self.timeout, self.backoff, self.max_tokens = timeout, backoff, max_tokens
        self.api_key, self.api_key_env, self._announced = None, api_key_env, False
        if api_key_env:
            self.api_key = os.environ.get(api_key_env)
            if not self.api_key:
                raise DadpoError(
                    f"judge API key: environment variable {api_key_env} is not set "
                    f"(set it, or choose another variable with --judge-api-key-env)"
                )
        self.id = f"openai:{base_url.rstrip('/')}:{model}"

    def _redo(self, cached: dict | None) -> bool:
        """Also an unparsable reply written under a smaller `max_tokens`: it may have been cut off."""
        return cached is None or (cached["verdict"] is None and cached.get("max_tokens", 0) < self.max_tokens)

    def _post(self, messages: list[dict]) -> str:
        body = json.dumps(
            {"model": self.model, "messages": messages, "temperature": 0, "max_tokens": self.max_tokens}
        ).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1) * (1 + 0.25 * random.random()))
            try:
                req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    data = json.loads(resp.read())
                return data["choices"][0]["message"]["content"] or ""
            except urllib.error.HTTPError as e:
                detail = e.read().decode(errors="replace")[:200]
                if e.code not in (408, 429) and e.code < 500:  # our request is wrong: retrying will not help
                    raise DadpoError(
                        f"judge endpoint {self.url} refused the request: HTTP {e.code} {detail}"
                    ) from None
                last = f"HTTP {e.code} {detail}"
            except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out, torn reply
                last = str(getattr(e, "reason", e))
            except (KeyError, IndexError, TypeError, json.JSONDecodeError) as e:
                raise DadpoError(
                    f"judge endpoint {self.url} sent a reply that is not a chat completion ({e})"
                ) from None
            log.warning("judge request failed (%s); try %d/%d", last, attempt + 1, self.retries + 1)
        raise DadpoError(f"judge endpoint {self.url} unreachable after {self.retries + 1} tries: {last}")

    def _announce_key(self) -> None:
        """Say once, before the first request, which host receives the key (its variable, never its value)."""
        if self.api_key and not self._announced:
            url = urllib.parse.urlsplit(self.url)
            log.info("judge: sending $%s to %s over %s", self.api_key_env, url.netloc.rpartition("@")[2], url.scheme)
            self._announced = True

    def _run(self, todo, cache, progress):
        """Up to `concurrency` requests at a time. Each worker caches its own verdict as soon as the reply
        is in; on a failure or a Ctrl-C no queued request starts, and the main thread waits for the ones
        already sent (counted in `in_flight` under one lock, so the wait holds whatever instant the
        interrupt lands at, even while the workers are still being started)."""
        self._announce_key()
        bar = tqdm(total=len(todo), desc=f"judge {self.model}", unit="verdict", disable=not progress)
        state = threading.Condition()
        queued, errors, in_flight, stop = list(reversed(todo)), [], 0, False

        def worker() -> None:
            nonlocal in_flight, stop
            while True:
                with state:
                    if stop or not queued:
                        return
                    key, messages = queued.pop()
                    in_flight += 1
                try:
                    reply = self._post(messages)
                    with state:
                        cache.add([{"key": key, "verdict": parse_verdict(reply), "reply": reply,
                                    "max_tokens": self.max_tokens}])
                        bar.update(1)
                except Exception as e:  # noqa: BLE001 (re-raised by the main thread)
                    with state:
                        errors.append(e)
                        stop = True
                finally:
                    with state:
                        in_flight -= 1
                        state.notify_all()

        try:
            for i in range(min(self.concurrency, len(todo))):
                threading.Thread(target=worker, name=f"judge-{i}", daemon=True).start()
            with state:
                state.wait_for(lambda: in_flight == 0 and (stop or not queued))
        finally:
            with state:
                stop = True
                state.wait_for(lambda: in_flight == 0)
            bar.close()
        if errors:
            raise errors[0]


class LocalJudge(Judge):
    """A local HF chat model as judge: the verdict is the most likely of the tokens A/B/C right after the
    assistant turn opens with `[[`; the three probabilities are kept. Deterministic, never invalid.

    `fingerprint` (`dadpo.models.model_fingerprint` of the spec `name`) joins the verdict cache key, so a
    judge folder whose weights changed judges again instead of serving the old model's verdicts."""

    def __init__(self, model, tok, name: str, batch_size: int = 4, fingerprint: str | None = None):
        self.model, self.tok, self.batch_size = model, tok, batch_size
        self.id = f"local:{name}"
        self._cache_id = self.id if fingerprint in (None, name) else f"{self.id}@{fingerprint}"
        ids = [tok.encode(v, add_special_tokens=False) for v in VERDICTS]
        if any(len(i) != 1 for i in ids):
            raise DadpoError(f"judge {name}: verdict letters are not single tokens in its tokenizer")
        self.verdict_ids = [i[0] for i in ids]

    @property
    def cache_id(self) -> str:
        return self._cache_id

    @torch.inference_mode()
    def _scores(self, prompts: list[list[dict]]) -> torch.Tensor:
        texts = [
            self.tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False) + "[["
            for p in prompts
        ]
        side = self.tok.padding_side
        self.tok.padding_side = "left"
        try:
            enc = self.tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        finally:
            self.tok.padding_side = side
        enc = enc.to(self.model.device)
        pos = (enc.attention_mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.model(**enc, position_ids=pos, use_cache=False, logits_to_keep=1).logits[:, -1].float()
        return torch.log_softmax(logits, -1)[:, self.verdict_ids]

    def _run(self, todo, cache, progress):
        todo = sorted(todo, key=lambda kv: -len(json.dumps(kv[1])))  # similar lengths share a batch
        bar = tqdm(total=len(todo), desc=f"judge {self.id}", unit="verdict", disable=not progress)
        for start in range(0, len(todo), self.batch_size):
            batch = todo[start : start + self.batch_size]
            logp = self._scores([msgs for _, msgs in batch])
            rows = [
                {
                    "key": key,
                    "verdict": VERDICTS[int(lp.argmax())],
                    "logprobs": dict(zip(VERDICTS, [round(x, 4) for x in lp.tolist()], strict=True)),
                }
                for (key, _), lp in zip(batch, logp, strict=True)
            ]
            cache.add(rows)
            bar.update(len(rows))
        bar.close()
