"""Evaluation: offline answer scores and the client for OpenAI-compatible endpoints.

(Two-step inference and the Visual-CoT benchmark protocol are built on these; see the evaluation issue.)
"""

from __future__ import annotations

import base64
import io
import json
import re
import string
import urllib.error
import urllib.request

from PIL import Image

# --------------------------------------------------------------------------------------------
# Offline answer scores. A reference may be one string or a list of acceptable strings; the score
# is the best over the list.

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and articles, collapse whitespace (SQuAD/VQA-style)."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCT))
    return " ".join(text.split())


def _as_list(reference: str | list[str]) -> list[str]:
    return [reference] if isinstance(reference, str) else list(reference)


def exact_match(prediction: str, reference: str | list[str]) -> float:
    """1.0 if the normalised prediction equals a normalised reference, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(r) for r in _as_list(reference)))


def containment(prediction: str, reference: str | list[str]) -> float:
    """1.0 if a normalised reference appears as whole words inside the normalised prediction."""
    pred = f" {normalize_answer(prediction)} "
    return float(any(normalize_answer(r) and f" {normalize_answer(r)} " in pred for r in _as_list(reference)))


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions all cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls(prediction: str, reference: str | list[str], threshold: float = 0.5) -> float:
    """ANLS (Biten et al. 2019, DocVQA): max over references of 1 - NL if NL < threshold else 0,
    NL = edit distance / max length, on lower-cased, whitespace-stripped strings."""
    pred = " ".join(prediction.lower().split())
    best = 0.0
    for ref in _as_list(reference):
        ref = " ".join(ref.lower().split())
        if not pred and not ref:
            return 1.0
        nl = levenshtein(pred, ref) / max(len(pred), len(ref))
        best = max(best, 1.0 - nl if nl < threshold else 0.0)
    return best


def answer_scores(prediction: str, reference: str | list[str]) -> dict[str, float]:
    """All offline scores of one answer: exact match, ANLS, containment."""
    return {"exact_match": exact_match(prediction, reference), "anls": anls(prediction, reference),
            "containment": containment(prediction, reference)}


# --------------------------------------------------------------------------------------------
# OpenAI-compatible chat endpoint (vLLM, our own server, a judge model): plain urllib, no SDK.


class EndpointError(RuntimeError):
    """A failed call to an OpenAI-compatible endpoint (network, HTTP status or response shape)."""


def image_data_url(image: Image.Image) -> str:
    """A PNG data URL, the way OpenAI-style APIs take inline images."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def to_openai_messages(messages: list[dict], images: list[Image.Image]) -> list[dict]:
    """Our messages (content parts {"type": "image"} / {"type": "text"}) with images inlined in order."""
    remaining = iter(images)
    out = []
    for message in messages:
        content = message["content"]
        if not isinstance(content, str):
            content = [{"type": "image_url", "image_url": {"url": image_data_url(next(remaining))}}
                       if part["type"] == "image" else {"type": "text", "text": part["text"]} for part in content]
        out.append({"role": message["role"], "content": content})
    return out


def chat_completion(endpoint: str, messages: list[dict], model: str = "default", max_tokens: int = 64,
                    temperature: float = 0.0, top_p: float = 1.0, top_k: int | None = None,
                    timeout: float = 120.0) -> str:
    """The reply text of one /v1/chat/completions call; EndpointError on any failure."""
    url = endpoint.rstrip("/")
    if not url.endswith("/chat/completions"):
        url += "/chat/completions" if url.endswith("/v1") else "/v1/chat/completions"
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature,
            "top_p": top_p}
    if top_k:
        body["top_k"] = top_k  # vLLM's extension; other servers ignore unknown fields
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = json.loads(response.read().decode())
    except urllib.error.HTTPError as e:
        raise EndpointError(f"{url}: HTTP {e.code}: {e.read()[:300]!r}") from e
    except (urllib.error.URLError, TimeoutError, OSError, json.JSONDecodeError) as e:
        raise EndpointError(f"{url}: {type(e).__name__}: {e}") from e
    try:
        return payload["choices"][0]["message"]["content"] or ""
    except (KeyError, IndexError, TypeError) as e:
        raise EndpointError(f"{url}: unexpected response shape: {str(payload)[:300]}") from e
