"""OpenAI's chat API, both ends, plain urllib and no SDK: the one client generate.py and evaluate.py call
OpenAI-compatible endpoints with (vLLM, `visrl.py serve`, a judge model), and what serve.py needs to be one: a request
read as ours (its messages, its images decoded under the server's limits) and the completion answered.
"""

import base64
import io
import json
import math
import re
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from PIL import Image

import chat
import data
import model

class EndpointError(data.UserError):
    """A failed call to an OpenAI-compatible endpoint (network, HTTP status, response shape): one line, no traceback."""

def image_data_url(image: Image.Image) -> str:
    """A PNG data URL, the way OpenAI-style APIs take inline images."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()

def to_openai_messages(messages: list[dict], images: list[Image.Image], max_pixels: int = 0) -> list[dict]:
    """Our messages (content parts {"type": "image"} / {"type": "text"}) with images inlined in order, each first
    capped at max_pixels as the in-process model sees it (chat.cap_image; upstream's server caps as it receives them,
    at 512 x 512 pixels by default), so a model behind an endpoint gets the pixels it would get here; 0: as they are."""
    remaining = iter(chat.cap_image(image, max_pixels) for image in images)
    out = []
    for message in messages:
        content = message["content"]
        if not isinstance(content, str):
            content = [{"type": "image_url", "image_url": {"url": image_data_url(next(remaining))}}
                       if part["type"] == "image" else {"type": "text", "text": part["text"]} for part in content]
        out.append({"role": message["role"], "content": content})
    return out

BUSY_RETRIES = 8  # tries after a 503/429 (server queue full) before the call fails

def retry_after(header: str | None, attempt: int) -> float:
    """Seconds to wait before retrying a 503/429: 1, 2, 4 ... or the server's Retry-After if longer, at most 30."""
    asked = float(header) if header and header.strip().isdigit() else 0.0
    return min(max(asked, 2.0 ** attempt, 0.1), 30.0)  # backs off even when the server always says 1 s

def chat_completion(endpoint: str, messages: list[dict], model: str = "default", max_tokens: int | None = 64,
                    temperature: float | None = 0.0, top_p: float | None = 1.0, top_k: int | None = None,
                    timeout: float = 120.0, retries: int = 0) -> str:
    """The reply text of one /v1/chat/completions call; EndpointError on any failure after `retries` extra tries
    (1 s, 2 s, ... apart). A busy server (429/503) is waited for apart from these, as long as it asks."""
    for attempt in range(retries + 1):
        try:
            return _chat_once(endpoint, messages, model, max_tokens, temperature, top_p, top_k, timeout)
        except EndpointError:
            if attempt == retries:
                raise
            time.sleep(1.0 + attempt)

def _chat_once(endpoint, messages, model, max_tokens, temperature, top_p, top_k, timeout) -> str:
    url = endpoint.rstrip("/")
    if not url.endswith("/chat/completions"):
        url += "/chat/completions" if url.endswith("/v1") else "/v1/chat/completions"
    body = {"model": model, "messages": messages}
    # None leaves a field out, so the server's own default applies (the official judge request sends none)
    body.update({k: v for k, v in (("max_tokens", max_tokens), ("temperature", temperature), ("top_p", top_p))
                 if v is not None})
    if top_k:
        body["top_k"] = top_k  # vLLM's extension; other servers ignore unknown fields
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    for attempt in range(BUSY_RETRIES + 1):
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                payload = json.loads(response.read().decode())
            break
        except urllib.error.HTTPError as e:
            if e.code in (429, 503) and attempt < BUSY_RETRIES:  # a busy server: wait as it asks, then try again
                time.sleep(retry_after(e.headers.get("Retry-After"), attempt))
                continue
            raise EndpointError(f"{url}: HTTP {e.code}: {e.read()[:300]!r}") from e
        except (urllib.error.URLError, TimeoutError, OSError, json.JSONDecodeError) as e:
            raise EndpointError(f"{url}: {type(e).__name__}: {e}") from e
    try:
        return payload["choices"][0]["message"]["content"] or ""
    except (KeyError, IndexError, TypeError) as e:
        raise EndpointError(f"{url}: unexpected response shape: {str(payload)[:300]}") from e

# --------------------------------------------------------------------------------------------
# The server's end: a request read as ours, checked against the server's limits; the completion it answers.

class RequestError(Exception):
    """A request the server answers with an error status, OpenAI's error JSON and any extra headers."""

    def __init__(self, message: str, code: str = "bad_field", status: int = 400, headers: dict | None = None):
        super().__init__(message)
        self.message, self.code, self.status = message, code, status
        self.headers = headers or ({"Retry-After": "1"} if status == 503 else {})  # a slot frees as any request ends

    def body(self) -> dict:
        """The error as OpenAI's API writes it."""
        kind = {403: "permission_error", 404: "not_found_error", 500: "server_error", 503: "server_busy"}
        return {"error": {"message": self.message, "type": kind.get(self.status, "invalid_request_error"),
                          "code": self.code}}

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")  # no format whose decoder runs other programs (EPS)
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
UNSUPPORTED = ("stop", "tools", "functions", "logprobs", "top_logprobs", "logit_bias", "frequency_penalty",
               "presence_penalty")
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}  # OpenAI's -> ours

def decode_image(source, what: str, cfg, image_processor) -> Image.Image:
    """Open an image (a path or a file object), check its size from the header, then decode it as RGB."""
    try:
        im = Image.open(source, formats=IMAGE_FORMATS)  # lazy: reads the header only
    except Image.DecompressionBombError as e:  # only when --max-image-pixels is above PIL's own limit
        raise RequestError(f"{what}: {e}", "image_too_large", 413) from e
    except Exception as e:  # the type only: PIL's messages name the file, a server path
        raise RequestError(f"{what}: not a decodable image ({type(e).__name__})", "bad_image") from e
    with im:
        w, h = im.size
        if w * h > cfg.max_image_pixels:  # before any pixel is decoded: a small file can claim a huge image
            raise RequestError(f"{what}: {w}x{h} pixels is over the limit of {cfg.max_image_pixels} "
                               f"(--max-image-pixels)", "image_too_large", 413)
        try:
            chat.image_token_count(w, h, image_processor)  # the processor's own size rules (aspect ratio <= 200)
        except Exception as e:  # computed from (w, h) alone: its message names no file
            raise RequestError(f"{what}: cannot use the image ({e})", "bad_image") from e
        try:
            return im.convert("RGB")
        except Exception as e:
            raise RequestError(f"{what}: cannot decode the image ({type(e).__name__})", "bad_image") from e

def load_request_image(url: str, what: str, cfg, image_processor) -> Image.Image:
    """An image_url: a base64 data URL, or a path / file:// URL that must resolve under --image-root."""
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or not header.endswith(";base64"):
            raise RequestError(f"{what}: only base64 data URLs are supported (data:image/png;base64,...)",
                               "bad_image_url")
        try:
            raw = base64.b64decode("".join(payload.split()), validate=True)
        except ValueError as e:  # binascii.Error included
            raise RequestError(f"{what}: invalid base64 ({e})", "bad_base64") from e
        return decode_image(io.BytesIO(raw), what, cfg, image_processor)
    if url.startswith("file://"):
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise RequestError(f"{what}: file URL names another host {parts.netloc!r}", "bad_image_url")
        url = unquote(parts.path)
    elif re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", url):
        raise RequestError(f"{what}: remote image URLs are not fetched; send a data URL", "bad_image_url")
    if cfg.image_root is None:
        raise RequestError(f"{what}: image paths are refused (the server runs without --image-root); send the "
                           "image as a data URL", "image_paths_disabled", 403)
    try:  # follows symlinks and '..'; an absolute path replaces the root. Messages name the path as sent only
        path = data.path_inside(cfg.image_root, url)
    except data.PathError as e:  # malformed (a NUL byte, too long a name, a link loop): 400; outside the root: 403
        raise RequestError(f"{what}: {e}", *(("path_outside_image_root", 403) if e.outside else ("bad_image_path",)))
    if not path.is_file():  # checked after the root test: nothing outside the root can be probed
        raise RequestError(f"{what}: no image file {url!r} under --image-root", "image_not_found", 404)
    return decode_image(path, what, cfg, image_processor)

def number(value, key: str, default, low: float, high: float, integer: bool = False):
    """A request's numeric field: `default` when absent, else a finite number (an int if `integer`) in [low, high]."""
    if value is None:
        return default
    ok = isinstance(value, int) if integer else isinstance(value, (int, float)) and math.isfinite(value)
    if isinstance(value, bool) or not ok or not low <= value <= high:
        raise RequestError(f"'{key}' must be {'an integer' if integer else 'a number'} in [{low}, {high}], "
                           f"got {value!r:.40}")
    return value

# a request's temperature, top_p, top_k when it sends none: upstream's server (LLaMA-Factory
# hparams/generating_args.py l.27-72: 0.95, 0.7, 50), or OpenAI's API (1, 1, no top-k)
SAMPLING_DEFAULTS = {"upstream": (0.95, 0.7, 50), "openai": (1.0, 1.0, 0)}

def parse_sampling(payload: dict, cfg) -> tuple[model.Sampling, int | None]:
    """The request's decoding settings and seed; a field this server does not support is a 400."""
    if payload.get("stream"):
        raise RequestError("stream=true is not supported by this server; send stream=false", "stream_unsupported")
    if payload.get("n") not in (None, 1):
        raise RequestError("only n=1 is supported")
    for key in UNSUPPORTED:
        if payload.get(key) not in (None, False, 0, [], {}):
            raise RequestError(f"'{key}' is not supported by this server", "unsupported_field")
    if not isinstance(payload.get("model", ""), str):
        raise RequestError("'model' must be a string")
    limit = cfg.max_new_tokens_limit
    max_tokens = payload.get("max_completion_tokens", payload.get("max_tokens"))
    temperature, top_p, top_k = SAMPLING_DEFAULTS[cfg.sampling_defaults]
    sampling = model.Sampling(
        max_new_tokens=number(max_tokens, "max_tokens", limit, 1, limit, integer=True),
        temperature=float(number(payload.get("temperature"), "temperature", temperature, 0.0, 2.0)),
        top_p=float(number(payload.get("top_p"), "top_p", top_p, 0.0, 1.0)),
        top_k=max(0, number(payload.get("top_k"), "top_k", top_k, -1, 1 << 30, integer=True)))  # vLLM's; -1, 0: off
    return sampling, number(payload.get("seed"), "seed", None, -(1 << 63), (1 << 63) - 1, integer=True)

def parse_part(part, where: str) -> tuple[dict, str | None]:
    """One content part as ours ({"type": "text"} or {"type": "image"}), and its URL if it is an image."""
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
        if any(t in part["text"] for t in VISION_TOKENS):  # they would break the image <-> token pairing
            raise RequestError(f"{where}: text must not contain vision special tokens")
        return {"type": "text", "text": part["text"]}, None
    url = part.get("image_url") if kind == "image_url" else None
    url = url.get("url") if isinstance(url, dict) else url
    if not isinstance(url, str):
        raise RequestError(f"{where}: expected {{'type': 'text', 'text': ...}} or "
                           f"{{'type': 'image_url', 'image_url': {{'url': ...}}}}")
    return {"type": "image"}, url

def parse_messages(raw) -> tuple[list[dict], list[tuple[str, str, int]]]:
    """OpenAI's messages as ours, and each image's (url, where in the request, index of its message), in order."""
    if not isinstance(raw, list) or not raw:
        raise RequestError("'messages' must be a non-empty list")
    messages, urls = [], []
    for i, m in enumerate(raw):
        role, content = (m.get("role"), m.get("content")) if isinstance(m, dict) else (None, None)
        if role not in ROLES:
            raise RequestError(f"messages[{i}].role must be system, user or assistant, got {role!r:.40}")
        if not isinstance(content, (str, list)):
            raise RequestError(f"messages[{i}].content must be a string or a list of parts")
        if isinstance(content, list):  # a string stays one: the chat text is then exactly render_chat's for it
            parts = [parse_part(part, f"messages[{i}].content[{j}]") for j, part in enumerate(content)]
            urls += [(url, f"messages[{i}].content[{j}]", i) for j, (_, url) in enumerate(parts) if url is not None]
            content = [ours for ours, _ in parts]
        messages.append({"role": ROLES[role], "content": content})
    return messages, urls

IMAGE_PLACEHOLDER = "<image>"  # upstream's image slot in text (LLaMA-Factory extras/constants.py l.51)

def place_images(messages: list[dict], urls: list, image_order: str) -> tuple[list[dict], list]:
    """Upstream's placeholders (LLaMA-Factory chat/hf_engine.py l.89-90): when any text holds `<image>`, the request's
    images fill those slots in order and leave their own parts; the counts must match. Without any, images stay where
    their parts are, or (image_order `upstream`) all go before the first user message's text, as there."""
    def texts(message):
        content = message["content"]
        return [content] if isinstance(content, str) else [p["text"] for p in content if p["type"] == "text"]

    slots = sum(text.count(IMAGE_PLACEHOLDER) for m in messages for text in texts(m))
    if not slots and (image_order == "parts" or not urls):
        return messages, urls
    if not slots:  # upstream: as many placeholders as images, before the first user message's text
        first = next(i for i, m in enumerate(messages) if m["role"] == "user")
        messages = [dict(m) for m in messages]
        messages[first]["content"] = IMAGE_PLACEHOLDER * len(urls) + " ".join(texts(messages[first]))
        slots = len(urls)
    if slots != len(urls):
        raise RequestError(f"{slots} {IMAGE_PLACEHOLDER} placeholders in the text for {len(urls)} images: each image "
                           f"fills one, in order", "placeholder_mismatch")
    placed, placed_urls, remaining = [], [], iter(urls)
    for i, m in enumerate(messages):
        if isinstance(m["content"], str) and IMAGE_PLACEHOLDER not in m["content"]:
            placed.append(m)  # a string stays one (render_chat's text for it)
            continue
        content = []
        for text in texts(m):  # the message's own image parts are gone: the placeholders say where images go
            for k, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
                if k:
                    url, where, _ = next(remaining)
                    content.append({"type": "image"})
                    placed_urls.append((url, where, i))
                if piece:
                    content.append({"type": "text", "text": piece})
        placed.append({"role": m["role"], "content": content})
    return placed, placed_urls

@dataclass
class ChatRequest:
    """What a chat request asks, in our terms (serve.py's worker answers it)."""

    messages: list  # ours: content a string or parts {"type": "text"} / {"type": "image"}
    images: list  # decoded, in order
    sampling: model.Sampling
    seed: int | None
    visual_cot: bool = False
    question: str = ""  # visual_cot's: the recipe's own prompts use the last user message's image and text only

def parse_chat_request(body: bytes, cfg, image_processor) -> ChatRequest:
    """An OpenAI chat request body as ours (its images decoded once all else passed); RequestError if bad. cfg holds
    the limits (serve.ServeConfig's max_new_tokens_limit, max_images_per_request, max_image_pixels, image_root)."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise RequestError(f"the body is not valid JSON ({e})", "bad_json") from e
    if not isinstance(payload, dict):
        raise RequestError("the body must be a JSON object", "bad_json")
    sampling, seed = parse_sampling(payload, cfg)
    use_cot = payload.get("visual_cot", False)
    if not isinstance(use_cot, bool):
        raise RequestError("'visual_cot' must be true or false")
    messages, urls = place_images(*parse_messages(payload.get("messages")), cfg.image_order)
    if len(urls) > cfg.max_images_per_request:
        raise RequestError(f"{len(urls)} images; at most {cfg.max_images_per_request} per request", "too_many_images")
    request = ChatRequest(messages, [], sampling, seed, use_cot)
    if use_cot:
        last = messages[-1]
        if last["role"] != "user" or len(urls) != 1 or urls[0][2] != len(messages) - 1:
            raise RequestError("visual_cot needs exactly one image, in the last message, from the user")
        request.question = last["content"] if isinstance(last["content"], str) else " ".join(
            p["text"].strip() for p in last["content"] if p["type"] == "text").strip()
        if not request.question:
            raise RequestError("visual_cot needs a question (text) in the last user message")
    request.images = [load_request_image(url, where, cfg, image_processor) for url, where, _ in urls]
    return request

def completion(model_name: str, content: str, steps: list[model.Reply]) -> dict:
    """A chat.completion object as OpenAI's API returns it: usage sums the steps, and it ends as the last did."""
    prompt_tokens = sum(step.prompt_tokens for step in steps)
    completion_tokens = sum(step.completion_tokens for step in steps)
    return {"id": "chatcmpl-" + uuid.uuid4().hex, "object": "chat.completion", "created": int(time.time()),
            "model": model_name, "choices": [{"index": 0, "message": {"role": "assistant", "content": str(content)},
                                              "finish_reason": steps[-1].finish_reason, "logprobs": None}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}
