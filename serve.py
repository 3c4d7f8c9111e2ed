"""Serving the in-process model: `visrl.py serve`, an OpenAI-compatible server.

    python visrl.py serve --model CKPT --adapter runs/dpo2/adapter --image-root /data/images

It loads with model.load and answers `visual_cot` requests with chat.two_step (the same inference
evaluate.py and `infer` run). Top to bottom: request parsing (body, messages, images, limits); the worker
thread, the only one that touches the model, which batches requests; the HTTP handler and `serve`. Standard library
http.server only: no web framework.
"""

from __future__ import annotations

import base64
import binascii
import collections
import io
import json
import math
import queue
import re
import signal
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

import torch
from PIL import Image

import chat
import data
import runs
import evaluate
import model as modeling


# --------------------------------------------------------------------------------------------
# `visrl.py serve`: configuration, errors, request parsing.


@dataclass
class ServeConfig(runs.ConventionArgs):
    """An OpenAI-compatible server on the in-process model: POST /v1/chat/completions, GET /v1/models, GET /health."""

    model: str = "tiny"  # checkpoint directory, or `tiny` / `tiny-qwen2-vl`
    adapter: str | None = None  # a trained adapter (merged into the base)
    host: str = "127.0.0.1"  # localhost only: there is no authentication, think before 0.0.0.0
    port: int = 8000  # 0 picks a free port
    image_root: str | None = None  # image paths / file:// URLs must resolve under it; without it only data URLs
    served_model_name: str = "visrl"  # the name /v1/models lists and responses carry
    batch_size: int = 8  # requests generated together (equal sampling settings)
    max_queue: int = 64  # requests in progress (decoding, waiting, generating) once their body is in; more get 503
    max_body_bytes: int = 20 * 1024 * 1024  # larger bodies get 413 before they are read
    body_timeout: float = 30.0  # seconds for the whole body (not per read); a slower client gets 408 and is closed
    max_image_pixels: int = 4096 * 4096  # width * height, read from the header before decoding; more get 413
    max_images_per_request: int = 4
    max_new_tokens_limit: int = 1024  # the largest max_tokens a request may ask; also the default
    max_prompt_tokens: int = 16384  # prompt tokens (image tokens included) per generation
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    seed: int = 0  # seeds the random stream of sampled requests that send no seed


class RequestError(Exception):
    """A request the server answers with an error status and OpenAI's error JSON."""

    def __init__(self, status: int, message: str, code: str):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code

    def body(self) -> dict:
        kind = {403: "permission_error", 404: "not_found_error", 500: "server_error", 503: "server_busy"}
        return {"error": {"message": self.message, "type": kind.get(self.status, "invalid_request_error"),
                          "code": self.code}}


IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")  # no format whose decoder runs other programs (EPS)
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
UNSUPPORTED = ("stop", "tools", "functions", "logprobs", "top_logprobs", "logit_bias", "frequency_penalty",
               "presence_penalty")


def decode_image(source, what: str, cfg: ServeConfig, image_processor) -> Image.Image:
    """Open an image (a path or a file object), check its size from the header, then decode it as RGB."""
    try:
        im = Image.open(source, formats=IMAGE_FORMATS)  # lazy: reads the header only
    except Image.DecompressionBombError as e:  # only when --max-image-pixels is above PIL's own limit
        raise RequestError(413, f"{what}: {e}", "image_too_large") from e
    except Exception as e:  # the type only: PIL's messages name the file, a server path
        raise RequestError(400, f"{what}: not a decodable image ({type(e).__name__})", "bad_image") from e
    with im:
        w, h = im.size
        if w * h > cfg.max_image_pixels:  # before any pixel is decoded: a small file can claim a huge image
            raise RequestError(413, f"{what}: {w}x{h} pixels is over the limit of {cfg.max_image_pixels} "
                                    f"(--max-image-pixels)", "image_too_large")
        try:
            chat.image_token_count(w, h, image_processor)  # the processor's own size rules (aspect ratio <= 200)
        except Exception as e:  # computed from (w, h) alone: its message names no file
            raise RequestError(400, f"{what}: cannot use the image ({e})", "bad_image") from e
        try:
            return im.convert("RGB")
        except Exception as e:
            raise RequestError(400, f"{what}: cannot decode the image ({type(e).__name__})", "bad_image") from e


def load_request_image(url: str, what: str, cfg: ServeConfig, image_processor) -> Image.Image:
    """An image_url: a base64 data URL, or a path / file:// URL that must resolve under --image-root."""
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or not header.endswith(";base64"):
            raise RequestError(400, f"{what}: only base64 data URLs are supported (data:image/png;base64,...)", "bad_image_url")
        try:
            raw = base64.b64decode("".join(payload.split()), validate=True)
        except (binascii.Error, ValueError) as e:
            raise RequestError(400, f"{what}: invalid base64 ({e})", "bad_base64") from e
        return decode_image(io.BytesIO(raw), what, cfg, image_processor)
    if url.startswith("file://"):
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise RequestError(400, f"{what}: file URL names another host {parts.netloc!r}", "bad_image_url")
        url = unquote(parts.path)
    elif re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", url):
        raise RequestError(400, f"{what}: remote image URLs are not fetched; send a data URL", "bad_image_url")
    if cfg.image_root is None:
        raise RequestError(403, f"{what}: image paths are refused (the server runs without --image-root); "
                                "send the image as a data URL", "image_paths_disabled")
    try:  # follows symlinks and '..'; an absolute path replaces the root. Messages name the path as sent only
        path = data.path_inside(cfg.image_root, url)
    except data.PathError as e:  # malformed (a NUL byte, too long a name, a link loop): 400; outside the root: 403
        status, code = (403, "path_outside_image_root") if e.outside else (400, "bad_image_path")
        raise RequestError(status, f"{what}: {e}", code) from e
    if not path.is_file():  # checked after the root test: nothing outside the root can be probed
        raise RequestError(404, f"{what}: no image file {url!r} under --image-root", "image_not_found")
    return decode_image(path, what, cfg, image_processor)


def _number(payload: dict, key: str, default, low: float, high: float, integer: bool = False):
    value = payload.get(key)
    if value is None:
        return default
    ok = isinstance(value, int) if integer else isinstance(value, (int, float)) and math.isfinite(value)
    if isinstance(value, bool) or not ok or not low <= value <= high:
        raise RequestError(400, f"'{key}' must be {'an integer' if integer else 'a number'} in [{low}, {high}], "
                                f"got {value!r:.40}", "bad_field")
    return value


@dataclass
class Job:
    """One parsed request waiting for the worker; the handler thread waits on `done`."""

    messages: list  # ours: content a string or parts {"type": "text"} / {"type": "image"}
    images: list
    sampling: modeling.Sampling
    seed: int | None
    visual_cot: bool = False
    question: str = ""
    result: dict | None = None
    error: RequestError | None = None
    done: threading.Event = field(default_factory=threading.Event)


def parse_chat_request(payload, cfg: ServeConfig, image_processor) -> Job:
    """Validate an OpenAI chat request and turn it into a Job (our messages, decoded images); RequestError if bad."""
    if not isinstance(payload, dict):
        raise RequestError(400, "the body must be a JSON object", "bad_json")
    if payload.get("stream"):
        raise RequestError(400, "stream=true is not supported by this server; send stream=false", "stream_unsupported")
    if payload.get("n") not in (None, 1):
        raise RequestError(400, "only n=1 is supported", "bad_field")
    for key in UNSUPPORTED:
        if payload.get(key) not in (None, False, 0, [], {}):
            raise RequestError(400, f"'{key}' is not supported by this server", "unsupported_field")
    if not isinstance(payload.get("model", ""), str):
        raise RequestError(400, "'model' must be a string", "bad_field")
    limit = cfg.max_new_tokens_limit
    max_tokens = payload.get("max_completion_tokens", payload.get("max_tokens"))
    max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", limit, 1, limit, integer=True)
    temperature = _number(payload, "temperature", 1.0, 0.0, 2.0)  # OpenAI's default when none is sent
    top_p = _number(payload, "top_p", 1.0, 0.0, 1.0)
    top_k = _number(payload, "top_k", 0, -1, 1 << 30, integer=True)  # vLLM's extension; -1 or 0 = off
    seed = _number(payload, "seed", None, -(1 << 63), (1 << 63) - 1, integer=True)
    use_cot = payload.get("visual_cot", False)
    if not isinstance(use_cot, bool):
        raise RequestError(400, "'visual_cot' must be true or false", "bad_field")
    raw = payload.get("messages")
    if not isinstance(raw, list) or not raw:
        raise RequestError(400, "'messages' must be a non-empty list", "bad_field")
    urls, messages = [], []
    for i, m in enumerate(raw):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("system", "developer", "user", "assistant"):
            raise RequestError(400, f"messages[{i}].role must be system, user or assistant, got {role!r:.40}", "bad_field")
        content = m.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise RequestError(400, f"messages[{i}].content must be a string or a list of parts", "bad_field")
        ours = []
        for j, part in enumerate(parts):
            where, kind = f"messages[{i}].content[{j}]", part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                if any(t in part["text"] for t in VISION_TOKENS):  # they would break the image <-> token pairing
                    raise RequestError(400, f"{where}: text must not contain vision special tokens", "bad_field")
                ours.append({"type": "text", "text": part["text"]})
            elif kind == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str):
                    raise RequestError(400, f"{where}: image_url.url must be a string", "bad_field")
                urls.append((url, where, i))
                ours.append({"type": "image"})
            else:
                raise RequestError(400, f"{where}: expected {{'type': 'text', 'text': ...}} or "
                                        f"{{'type': 'image_url', 'image_url': {{'url': ...}}}}", "bad_field")
        # a plain string stays a string, so the chat text is exactly what render_chat gives for it
        messages.append({"role": "system" if role == "developer" else role,
                         "content": content if isinstance(content, str) else ours})
    if len(urls) > cfg.max_images_per_request:  # counted before anything is decoded
        raise RequestError(400, f"{len(urls)} images; at most {cfg.max_images_per_request} per request", "too_many_images")
    sampling = modeling.Sampling(max_new_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p),
                                 top_k=max(0, top_k))
    if use_cot:  # the recipe's own prompts: only the last user message's image and text are used
        last = messages[-1]
        if last["role"] != "user" or len(urls) != 1 or urls[0][2] != len(messages) - 1:
            raise RequestError(400, "visual_cot needs exactly one image, in the last message, from the user", "bad_field")
        question = last["content"] if isinstance(last["content"], str) else " ".join(
            p["text"].strip() for p in last["content"] if p["type"] == "text").strip()
        if not question:
            raise RequestError(400, "visual_cot needs a question (text) in the last user message", "bad_field")
    images = [load_request_image(url, where, cfg, image_processor) for url, where, _ in urls]
    return Job(messages, images, sampling, seed, use_cot, question if use_cot else "")


# --------------------------------------------------------------------------------------------
# The worker: the one thread that runs the model, batching queued requests with equal settings.


class _Recorder:
    """Stands in for the net inside modeling.sample and keeps each net.generate output, so token counts and
    finish reasons are exact while the reply text is modeling.sample's own."""

    def __init__(self, net):
        self.net, self.calls = net, []

    def __getattr__(self, name):
        return getattr(self.net, name)

    def generate(self, **kwargs):
        out = self.net.generate(**kwargs)
        self.calls.append((kwargs["attention_mask"], out))
        return out


def batch_key(job: Job) -> tuple:
    """Jobs with equal keys may share a generate call."""
    s = job.sampling
    if s.temperature == 0:
        return (job.visual_cot, s.max_new_tokens)
    # a seeded sampled request runs alone: its seed then fixes its reply whatever else is queued
    return (job.visual_cot, s.max_new_tokens, s.temperature, s.top_p, s.top_k, id(job) if job.seed is not None else None)


class Worker(threading.Thread):
    """Owns the model. Takes the oldest waiting job and up to batch_size - 1 more with its key, generates them
    together, hands each its result; nothing is dropped, and the oldest job is always served next."""

    def __init__(self, net, processor, cfg: ServeConfig):
        super().__init__(name="visrl-worker", daemon=True)
        self.net, self.processor, self.cfg = net, processor, cfg
        self.jobs: queue.Queue = queue.Queue()  # unbounded: admission (--max-queue) is counted by the handlers
        self.held: collections.deque = collections.deque()  # taken from the queue, not yet run
        self.model_lock = threading.Lock()  # held while a batch runs (tests hold it to let requests queue up)
        self.batch_sizes: collections.deque = collections.deque(maxlen=1000)  # recent batch sizes, for tests and logs
        self._closed, self._guard = False, threading.Lock()
        tok = processor.tokenizer
        self.stop_ids = {tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")}

    def submit(self, job: Job) -> None:
        """Queue a job; RequestError 503 once the worker is stopping."""
        with self._guard:
            if self._closed:
                raise RequestError(503, "the server is shutting down", "shutting_down")
            self.jobs.put(job)

    def pending(self) -> int:
        """Jobs waiting (queued or held)."""
        return self.jobs.qsize() + len(self.held)

    def stop(self) -> None:
        """Finish every accepted job, then end the thread."""
        with self._guard:
            self._closed = True
            self.jobs.put(None)
        self.join()

    def run(self) -> None:
        stopping = False
        while not (stopping and not self.held):
            if not self.held:
                job = self.jobs.get()
                if job is None:
                    break
                self.held.append(job)
            with self.model_lock:
                while True:  # everything queued by now joins, so a batch can pick from all of it
                    try:
                        job = self.jobs.get_nowait()
                    except queue.Empty:
                        break
                    if job is None:
                        stopping = True
                    else:
                        self.held.append(job)
                key = batch_key(self.held[0])
                batch = [j for j in self.held if batch_key(j) == key][:self.cfg.batch_size]
                for j in batch:
                    self.held.remove(j)
                self.batch_sizes.append(len(batch))
                self.run_batch(batch)

    def run_batch(self, batch: list[Job]) -> None:
        """Generate a batch; if it fails, each job alone, so one bad request cannot fail the others."""
        try:
            todo = [j for j in batch if self._fits(j)]
            if todo:
                self._generate_jobs(todo)
        except Exception as e:
            if len(batch) > 1:
                for job in batch:
                    self.run_batch([job])
                return
            traceback.print_exc(file=sys.stderr)  # the details go to the log only: they may name server paths
            batch[0].error = RequestError(500, f"generation failed ({type(e).__name__})", "generation_failed")
            batch[0].done.set()

    def _fits(self, job: Job) -> bool:
        """Check the prompt length here, where the tokenizer is only used by this thread."""
        tok, ip = self.processor.tokenizer, self.processor.image_processor
        if job.visual_cot:  # the answer step is the longer one; its crop counted as the whole image: an upper bound
            size = job.images[0].size
            n = len(chat.encode(tok, ip, chat.answer_messages(job.question, self.cfg.prompts), [size, size])[0])
        else:
            n = len(chat.encode(tok, ip, job.messages, [im.size for im in job.images])[0])
        if n > self.cfg.max_prompt_tokens:
            job.error = RequestError(400, f"the prompt is {n} tokens (images included), over the limit of "
                                          f"{self.cfg.max_prompt_tokens} (--max-prompt-tokens)", "context_length_exceeded")
            job.done.set()
        return job.error is None

    def _generate(self, prompts: list, job: Job) -> list[tuple[str, int, int, str]]:
        """(reply, prompt tokens, completion tokens, finish reason) for each prompt, in one modeling.sample call."""
        recorder = _Recorder(self.net)
        seed = job.seed if job.sampling.temperature > 0 else None
        texts = modeling.sample(recorder, self.processor, prompts, job.sampling, batch_size=len(prompts), seed=seed)
        (mask, out), = recorder.calls
        length, rows = mask.shape[1], []
        for i, text in enumerate(texts):
            new = out[i, length:].tolist()
            end = next((k + 1 for k, t in enumerate(new) if t in self.stop_ids), None)  # the stop token counts
            rows.append((text, int(mask[i].sum()), end or len(new), "stop" if end else "length"))
        return rows

    def _generate_jobs(self, batch: list[Job]) -> None:
        if batch[0].visual_cot:
            steps = []

            def generate_fn(prompts):
                steps.append(self._generate(prompts, batch[0]))
                return [r[0] for r in steps[-1]]
            questions = [j.question for j in batch]
            rows = chat.two_step(generate_fn, [j.images[0] for j in batch],
                                 [chat.focus_messages(q, self.cfg.prompts) for q in questions], questions,
                                 self.cfg.crop, self.cfg.prompts)
            for i, (job, row) in enumerate(zip(batch, rows)):
                focus, answer = steps[0][i], steps[1][i]
                job.result = completion(self.cfg, row["answer"], focus[1] + answer[1], focus[2] + answer[2], answer[3])
                job.result["visual_cot"] = {k: row[k] for k in ("box_text", "box", "crop")}
        else:
            for job, (text, prompt, completion_tokens, finish) in zip(
                    batch, self._generate([(j.messages, j.images) for j in batch], batch[0])):
                job.result = completion(self.cfg, text, prompt, completion_tokens, finish)
        for job in batch:
            job.done.set()


def completion(cfg: ServeConfig, content: str, prompt_tokens: int, completion_tokens: int, finish: str) -> dict:
    """A chat.completion object, as OpenAI's API returns it."""
    return {"id": "chatcmpl-" + uuid.uuid4().hex, "object": "chat.completion", "created": int(time.time()),
            "model": cfg.served_model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish,
                         "logprobs": None}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


# --------------------------------------------------------------------------------------------
# HTTP: handler threads read, validate and decode; the worker generates.


def make_handler(cfg: ServeConfig, worker: Worker):
    """The request handler class for this server (one instance per request, in its own thread)."""
    slots = threading.BoundedSemaphore(cfg.max_queue)
    reading = threading.BoundedSemaphore(2 * cfg.max_queue)  # bodies being read at once: at most this x --max-body-bytes
    started = int(time.time())

    class Handler(BaseHTTPRequestHandler):
        server_version = "visrl"  # HTTP/1.0 (the default): one request per connection, so a refused body needs no draining
        timeout = 60  # seconds of client silence before the connection (and its thread) is dropped

        def _any_method(self):
            self._route(self.command)

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _any_method  # a wrong method gets 405, not 501

        def log_request(self, code="-", size="-"):
            pass  # _route logs one line per request itself, with the time taken

        def _route(self, method: str) -> None:
            begin, path = time.monotonic(), urlsplit(self.path).path.rstrip("/") or "/"
            routes = {"/health": {"GET": lambda: {"status": "ok"}},
                      "/v1/models": {"GET": lambda: {"object": "list", "data": [
                          {"id": cfg.served_model_name, "object": "model", "created": started, "owned_by": "visrl"}]}},
                      "/v1/chat/completions": {"POST": self._chat}}
            try:
                if path not in routes:
                    raise RequestError(404, f"no route {method} {path}", "not_found")
                if method not in routes[path]:
                    raise RequestError(405, f"{path} takes {', '.join(routes[path])}, not {method}", "method_not_allowed")
                status, body = 200, routes[path][method]()
            except RequestError as e:
                status, body = e.status, e.body()
            except Exception as e:  # a bug here must not kill the server: a 500, its details in the log only
                traceback.print_exc(file=sys.stderr)
                status, body = 500, RequestError(500, f"internal error ({type(e).__name__})", "internal_error").body()
            note = (f"tokens {body['usage']['prompt_tokens']}+{body['usage']['completion_tokens']}" if "usage" in body
                    else body.get("error", {}).get("code", ""))
            # logged before the reply goes out, so a client that has its answer has its log line too
            sys.stderr.write(f"{self.address_string()} {method} {path} {status} "
                             f"{1000 * (time.monotonic() - begin):.0f}ms {note}\n")
            raw = json.dumps(body).encode()
            try:
                self.send_response(status)
                if status == 405:
                    self.send_header("Allow", ", ".join(routes[path]))
                if status == 503:
                    self.send_header("Retry-After", "1")  # seconds; a slot frees as soon as any request ends
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)
                self._drain()
            except OSError:
                pass  # the client went away; nothing to answer

        def _drain(self) -> None:
            """Discard a refused body (up to 64 MiB, 10 s): a client that sends it all before reading (urllib
            does) then gets its 413 instead of a broken pipe."""
            left, deadline = min(getattr(self, "unread", 0), 64 << 20), time.monotonic() + 10
            while left > 0 and time.monotonic() < deadline:
                chunk = self.rfile.read1(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)

        def _read_body(self) -> bytes:
            """The request body, all of which must arrive within --body-timeout seconds (408 otherwise): one
            deadline for the whole body, as a socket timeout restarts with every byte a slow client sends."""
            length = self.headers.get("Content-Length")
            if length is None or "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                raise RequestError(411, "a Content-Length header is required", "length_required")
            if not length.strip().isdigit():
                raise RequestError(400, f"bad Content-Length {length!r:.40}", "bad_request")
            if int(length) > cfg.max_body_bytes:  # refused unread (drained after the reply, see _drain)
                self.unread = int(length)
                raise RequestError(413, f"body of {int(length)} bytes is over the limit of {cfg.max_body_bytes} "
                                        f"(--max-body-bytes)", "body_too_large")
            deadline, chunks, left = time.monotonic() + cfg.body_timeout, [], int(length)
            try:
                while left > 0:
                    if time.monotonic() >= deadline:
                        raise TimeoutError
                    self.connection.settimeout(max(deadline - time.monotonic(), 1e-3))
                    chunk = self.rfile.read1(min(left, 1 << 20))
                    if not chunk:
                        raise RequestError(400, f"the body ended after {int(length) - left} of {length} bytes",
                                           "bad_request")
                    chunks.append(chunk)
                    left -= len(chunk)
            except TimeoutError as e:
                raise RequestError(408, f"the body did not arrive within {cfg.body_timeout:g} s (--body-timeout)",
                                   "timeout") from e
            finally:
                self.connection.settimeout(self.timeout)  # for writing the reply
            return b"".join(chunks)

        def _chat(self) -> dict:
            if not reading.acquire(blocking=False):  # bounds the memory of bodies being read, as slots do after
                raise RequestError(503, f"server busy: {2 * cfg.max_queue} request bodies arriving; retry",
                                   "server_busy")
            try:
                body = self._read_body()
            finally:
                reading.release()
            if not slots.acquire(blocking=False):  # after the body (a slow client holds none), before decoding
                raise RequestError(503, f"server busy: {cfg.max_queue} requests in progress (--max-queue); retry",
                                   "server_busy")
            try:
                try:
                    payload = json.loads(body)
                except (ValueError, RecursionError) as e:
                    raise RequestError(400, f"the body is not valid JSON ({e})", "bad_json") from e
                job = parse_chat_request(payload, cfg, worker.processor.image_processor)
                worker.submit(job)
                job.done.wait()
                if job.error is not None:
                    raise job.error
                return job.result
            finally:
                slots.release()

    return Handler


class Server(ThreadingHTTPServer):
    """A backlog for bursts (the stdlib's 5 reset clients under 30 at once); handler threads never block exit."""

    request_queue_size = 128
    daemon_threads = True


def make_server(cfg: ServeConfig, net=None, processor=None) -> tuple[Server, Worker]:
    """The bound HTTP server (not yet serving: call serve_forever) and its started worker; net/processor
    default to loading cfg.model (+ cfg.adapter). Port 0 picks a free port: see httpd.server_address.
    A missing --image-root or a taken port is a UserError, raised before the model is loaded."""
    cfg = evaluate.square_boxes(modeling.resolve_convention(cfg))  # the adapter's prompts, crop and pixel cap
    if cfg.image_root is not None and not Path(cfg.image_root).is_dir():
        raise data.UserError(f"--image-root {cfg.image_root}: no such directory")
    try:  # bound first, so a taken port fails before a long load; connections wait in the backlog till serve_forever
        httpd = Server((cfg.host, cfg.port), BaseHTTPRequestHandler)
    except OSError as e:
        raise data.UserError(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e}") from e
    try:
        if net is None:
            net, processor = modeling.load(cfg.model, cfg.adapter, cfg.device, cfg.dtype, cfg.max_pixels)
        torch.manual_seed(cfg.seed)
        worker = Worker(net, processor, cfg)
    except BaseException:
        httpd.server_close()
        raise
    worker.start()
    httpd.RequestHandlerClass = make_handler(cfg, worker)
    return httpd, worker


def serve_command(cfg: ServeConfig) -> None:
    """Serve until Ctrl-C or SIGTERM."""
    httpd, worker = make_server(cfg)
    host, port = httpd.server_address[:2]
    if cfg.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {cfg.host}: there is no authentication; anyone who can reach it can use "
              f"the model{' and read images under ' + cfg.image_root if cfg.image_root else ''}", file=sys.stderr)

    def terminate(*_):
        raise KeyboardInterrupt  # lands in serve_forever below: the same clean exit as Ctrl-C

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, terminate)
    print(f"serving {cfg.model}{' + ' + cfg.adapter if cfg.adapter else ''} as '{cfg.served_model_name}' on "
          f"http://{host}:{port}/v1 (POST /v1/chat/completions, GET /v1/models, GET /health)", flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
        worker.stop()
