"""Serving the in-process model: `visrl.py serve`, an OpenAI-compatible server on the standard library's http.server.

    python visrl.py serve --model CKPT --adapter runs/dpo2/adapter --image-root /data/images

It loads with model.load and answers `visual_cot` requests with chat.two_step (the same inference evaluate.py and
`infer` run). A request is read as ours by endpoint.parse_chat_request (OpenAI's format, both ends, is there).
"""

from __future__ import annotations

import collections
import contextlib
import json
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

import torch

import chat
import data
import endpoint
import model
import runs
from endpoint import RequestError

# --------------------------------------------------------------------------------------------
# `visrl.py serve`: its configuration, and the job a request becomes.

@dataclass
class ServeConfig(runs.ConventionArgs):
    """An OpenAI-compatible server on the in-process model: POST /v1/chat/completions, GET /v1/models, GET /health."""

    model: str = "tiny"  # checkpoint directory, or `tiny` / `tiny-qwen2-vl` / `tiny-qwen3-vl` / `tiny-qwen3.5`
    adapter: Annotated[str | None, runs.default("none: the base model alone")] = None  # an adapter merged into the base
    host: str = "127.0.0.1"  # the address to listen on; there is no authentication, so think before 0.0.0.0
    port: int = 8000  # the port to listen on; 0 picks a free one
    # image paths and file:// URLs must resolve under this directory
    image_root: Annotated[str | None, runs.default("none: data URLs only")] = None
    served_model_name: str = "visrl"  # the name /v1/models lists and responses carry
    batch_size: int = 8  # the most requests generated together (equal sampling settings)
    max_queue: int = 64  # the most requests in progress (decoded, waiting, generating) once their body is in; more: 503
    max_body_bytes: int = 20 * 1024 * 1024  # the largest request body; a larger one gets 413 before it is read
    body_timeout: float = 30.0  # seconds for the whole body (not per read); a slower client gets 408 and is closed
    max_image_pixels: int = 4096 * 4096  # the largest image, width * height (read before decoding); more get 413
    max_images_per_request: int = 4  # images one request may send; more get 400 before any is decoded
    max_new_tokens_limit: int = 1024  # the largest max_tokens a request may ask; also the default
    # what a request that sends no temperature / top_p / top_k gets: upstream's server's (LLaMA-Factory's generating
    # args: 0.95, 0.7, 50), or OpenAI's (1, 1, none)
    sampling_defaults: Literal["upstream", "openai"] = "upstream"
    # where images go in a request whose text has no `<image>` placeholder (with them, the images fill them in
    # order, as upstream's server reads them): `parts`, where the image parts are (OpenAI's meaning, and what
    # visrl's own clients send), or `upstream`, all before the first user message's text, as LLaMA-Factory's does
    image_order: Literal["parts", "upstream"] = "parts"
    max_prompt_tokens: int = 16384  # the longest prompt in tokens, image tokens included; a longer one gets 400
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # the weights' dtype; auto: bfloat16 on a GPU, else float32
    seed: int = 0  # seeds the random stream of sampled requests that send no seed

@dataclass(eq=False)  # compared by identity: a job is one request
class Job(endpoint.ChatRequest):
    """One parsed request waiting for the worker; the handler thread waits on `done`."""

    result: dict | None = None
    error: RequestError | None = None
    done: threading.Event = field(default_factory=threading.Event)

# --------------------------------------------------------------------------------------------
# The worker: the one thread that runs the model, batching queued requests with equal settings.

def batch_key(job: Job) -> tuple:
    """Jobs with equal keys may share a generate call."""
    s = job.sampling
    if s.temperature == 0:
        return (job.visual_cot, s.max_new_tokens)
    alone = id(job) if job.seed is not None else None  # a seeded sampled request alone: its seed fixes its reply
    return (job.visual_cot, s.max_new_tokens, s.temperature, s.top_p, s.top_k, alone)

def complete_batch(net, processor, cfg: ServeConfig, batch: list[Job]) -> list[dict]:
    """Each job's chat.completion from model.sample; visual_cot runs chat.two_step (focus, answer) and counts both."""
    first, steps = batch[0], []  # steps: model.sample's replies, one list per call
    seed = first.seed if first.sampling.temperature > 0 else None

    def generate_fn(prompts: list) -> list[model.Reply]:  # model.sample with the batch's settings, kept for the usage
        steps.append(model.sample(net, processor, prompts, first.sampling, batch_size=len(prompts), seed=seed))
        return steps[-1]

    if not first.visual_cot:
        replies = generate_fn([(j.messages, j.images) for j in batch])
        return [endpoint.completion(cfg.served_model_name, reply, [reply]) for reply in replies]
    questions = [j.question for j in batch]
    rows = chat.two_step(generate_fn, [j.images[0] for j in batch],
                         [chat.focus_messages(q, cfg.prompts) for q in questions], questions, cfg.crop, cfg.prompts,
                         box_form=cfg.box_form, image_processor=processor.image_processor)
    return [{**endpoint.completion(cfg.served_model_name, row["answer"], [step[i] for step in steps]),
             "visual_cot": {k: row[k] for k in ("box_text", "box", "crop")}} for i, row in enumerate(rows)]

class Worker(threading.Thread):
    """Owns the model: generates the oldest waiting job with up to batch_size - 1 more of its key; drops nothing."""

    def __init__(self, net, processor, cfg: ServeConfig):
        super().__init__(name="visrl-worker", daemon=True)
        self.net, self.processor, self.cfg = net, processor, cfg
        self.waiting: list[Job] = []  # oldest first; unbounded: admission (--max-queue) is the server's
        self.closed = False  # stopping: no new job, and the thread ends once nothing waits
        self.changed = threading.Condition()  # guards waiting and closed; notified when either changes
        self.model_lock = threading.Lock()  # held while a batch runs (tests hold it to let requests queue up)
        self.batch_sizes: collections.deque = collections.deque(maxlen=1000)  # recent batch sizes, for tests and logs

    def answer(self, job: Job) -> dict:
        """Queue a job and wait for its chat.completion; its RequestError if it failed (503 once stopping)."""
        with self.changed:
            if self.closed:
                raise RequestError("the server is shutting down", "shutting_down", 503)
            self.waiting.append(job)
            self.changed.notify()
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def pending(self) -> int:
        """Jobs waiting for a batch."""
        with self.changed:
            return len(self.waiting)

    def stop(self) -> None:
        """Finish every accepted job, then end the thread."""
        with self.changed:
            self.closed = True
            self.changed.notify()
        self.join()

    def run(self) -> None:
        """Run batches, the oldest job's first, until stopped with nothing waiting."""
        while True:
            with self.changed:
                self.changed.wait_for(lambda: self.waiting or self.closed)
                if not self.waiting:
                    return
            with self.model_lock:  # the batch is picked once the model is free, from everything waiting by then
                with self.changed:
                    key = batch_key(self.waiting[0])
                    batch = [job for job in self.waiting if batch_key(job) == key][:self.cfg.batch_size]
                    self.waiting = [job for job in self.waiting if job not in batch]
                self.batch_sizes.append(len(batch))
                self.run_batch(batch)

    def run_batch(self, batch: list[Job]) -> None:
        """Generate a batch; if it fails, each job alone, so one bad request cannot fail the others."""
        try:
            fits = [job for job in batch if self._fits(job)]
            for job, result in zip(fits, complete_batch(self.net, self.processor, self.cfg, fits) if fits else []):
                job.result = result
        except Exception as e:
            if len(batch) > 1:
                for job in batch:
                    self.run_batch([job])
                return
            traceback.print_exc(file=sys.stderr)  # the details go to the log only: they may name server paths
            batch[0].error = RequestError(f"generation failed ({type(e).__name__})", "generation_failed", 500)
        for job in batch:
            job.done.set()

    def _fits(self, job: Job) -> bool:
        """Within --max-prompt-tokens, else the job gets its 400 (counted here, the one thread using the tokenizer)."""
        # visual_cot: its answer step's prompt, the longer one, its crop counted as the whole image (an upper bound)
        messages = chat.answer_messages(job.question, self.cfg.prompts) if job.visual_cot else job.messages
        sizes = [im.size for im in job.images] * (2 if job.visual_cot else 1)
        n = len(chat.encode(self.processor.tokenizer, self.processor.image_processor, messages, sizes)[0])
        if n > self.cfg.max_prompt_tokens:
            job.error = RequestError(f"the prompt is {n} tokens (images included), over the limit of "
                                     f"{self.cfg.max_prompt_tokens} (--max-prompt-tokens)", "context_length_exceeded")
        return job.error is None

# --------------------------------------------------------------------------------------------
# HTTP: handler threads read, validate and decode; the worker generates.

def read_within(rfile, sock, size: int, seconds: float):
    """The next `size` bytes of a connection in chunks (fewer if it closes), all within `seconds`, else TimeoutError:
    one deadline for the whole read, as a socket timeout restarts with every byte a slow client sends."""
    deadline, timeout = time.monotonic() + seconds, sock.gettimeout()
    try:
        while size > 0:
            if time.monotonic() >= deadline:
                raise TimeoutError
            sock.settimeout(max(deadline - time.monotonic(), 1e-3))
            chunk = rfile.read1(min(size, 1 << 20))
            if not chunk:
                return
            size -= len(chunk)
            yield chunk
    finally:
        sock.settimeout(timeout)  # for writing the reply

@contextlib.contextmanager
def admitted(places: threading.BoundedSemaphore, busy: str):
    """Hold one of the places while the block runs; a 503 saying what is busy when none is free."""
    if not places.acquire(blocking=False):
        raise RequestError(f"server busy: {busy}; retry", "server_busy", 503)
    try:
        yield
    finally:
        places.release()

class Handler(BaseHTTPRequestHandler):
    """One request, in its own thread: route it, answer with JSON, log one line."""

    server_version = "visrl"  # HTTP/1.0 (the default): one request per connection
    timeout = 60  # seconds of client silence before the connection (and its thread) is dropped
    unread = 0  # bytes of a refused body still on the connection

    def _any_method(self):
        begin, path = time.monotonic(), urlsplit(self.path).path.rstrip("/") or "/"
        status, body, headers = self._answer(path)
        note = (f"tokens {body['usage']['prompt_tokens']}+{body['usage']['completion_tokens']}" if "usage" in body
                else body.get("error", {}).get("code", ""))
        # logged before the reply goes out, so a client that has its answer has its log line too
        sys.stderr.write(f"{self.address_string()} {self.command} {path} {status} "
                         f"{1000 * (time.monotonic() - begin):.0f}ms {note}\n")
        raw = json.dumps(body).encode()
        try:
            self.send_response(status)
            for key, value in {**headers, "Content-Type": "application/json", "Content-Length": len(raw)}.items():
                self.send_header(key, str(value))
            self.end_headers()
            self.wfile.write(raw)
            # a refused body is read and dropped (up to 64 MiB, 10 s): a client that sends it all before reading its
            # reply (urllib does) then gets its 413 instead of a broken pipe
            for _ in read_within(self.rfile, self.connection, min(self.unread, 64 << 20), 10):
                pass
        except OSError:
            pass  # the client went away; nothing to answer

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _any_method  # a wrong method gets 405, not 501

    def log_request(self, code="-", size="-"):
        """No stdlib log line: _any_method writes one per request, with the time taken."""

    def _answer(self, path: str) -> tuple[int, dict, dict]:
        server = self.server
        listed = {"id": server.cfg.served_model_name, "object": "model", "created": server.started, "owned_by": "visrl"}
        routes = {"/health": {"GET": lambda: {"status": "ok"}},
                  "/v1/models": {"GET": lambda: {"object": "list", "data": [listed]}},
                  "/v1/chat/completions": {"POST": lambda: server.chat(self._read_body)}}
        methods = routes.get(path, {})
        try:
            if not methods:
                raise RequestError(f"no route {self.command} {path}", "not_found", 404)
            if self.command not in methods:
                raise RequestError(f"{path} takes {', '.join(methods)}, not {self.command}", "method_not_allowed", 405,
                                   {"Allow": ", ".join(methods)})
            return 200, methods[self.command](), {}
        except RequestError as e:
            error = e
        except Exception as e:  # a bug here must not kill the server: a 500, its details in the log only
            traceback.print_exc(file=sys.stderr)
            error = RequestError(f"internal error ({type(e).__name__})", "internal_error", 500)
        return error.status, error.body(), error.headers

    def _read_body(self) -> bytes:
        length, cfg = self.headers.get("Content-Length"), self.server.cfg
        if length is None or "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise RequestError("a Content-Length header is required", "length_required", 411)
        if not length.strip().isdigit():
            raise RequestError(f"bad Content-Length {length!r:.40}", "bad_request")
        length = int(length)
        if length > cfg.max_body_bytes:  # refused unread (then drained, after the reply)
            self.unread = length
            raise RequestError(f"body of {length} bytes is over the limit of {cfg.max_body_bytes} (--max-body-bytes)",
                               "body_too_large", 413)
        try:
            body = b"".join(read_within(self.rfile, self.connection, length, cfg.body_timeout))
        except TimeoutError as e:
            raise RequestError(f"the body did not arrive within {cfg.body_timeout:g} s (--body-timeout)", "timeout",
                               408) from e
        if len(body) < length:
            raise RequestError(f"the body ended after {len(body)} of {length} bytes", "bad_request")
        return body

class Server(ThreadingHTTPServer):
    """The HTTP server and the chat API behind it."""

    request_queue_size = 128  # a backlog for bursts: the stdlib's 5 reset clients under 30 at once
    daemon_threads = True  # handler threads never block exit

    def __init__(self, cfg: ServeConfig):
        super().__init__((cfg.host, cfg.port), Handler)  # listening now: clients wait in the backlog till serving
        self.cfg, self.started, self.worker = cfg, int(time.time()), None
        self.slots = threading.BoundedSemaphore(cfg.max_queue)
        self.reading = threading.BoundedSemaphore(2 * cfg.max_queue)  # so bodies in memory are bounded too

    def chat(self, read_body) -> dict:
        """A chat completion: its body read (read_body) under `reading`, then parsed, decoded and generated under
        a slot (a slow client holds none); 503 when either is full."""
        with admitted(self.reading, f"{2 * self.cfg.max_queue} request bodies arriving"):
            body = read_body()
        with admitted(self.slots, f"{self.cfg.max_queue} requests in progress (--max-queue)"):
            request = endpoint.parse_chat_request(body, self.cfg, self.worker.processor.image_processor)
            return self.worker.answer(Job(**vars(request)))

def make_server(cfg: ServeConfig, net=None, processor=None) -> tuple[Server, Worker]:
    """The bound HTTP server (call serve_forever; port 0: see server_address) and its started worker; net/processor
    default to loading cfg.model (+ adapter). A missing --image-root or a taken port: UserError, before the load."""
    cfg = runs.resolve_convention(cfg)  # the adapter's prompts, crop, pixel cap and box form
    if cfg.image_root is not None and not Path(cfg.image_root).is_dir():
        raise data.UserError(f"--image-root {cfg.image_root}: no such directory")
    try:  # bound first, so a taken port fails before a long load
        httpd = Server(cfg)
    except OSError as e:
        raise data.UserError(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e}") from e
    try:
        if net is None:
            net, processor = model.load(cfg.model, cfg.adapter, dtype=cfg.dtype, max_pixels=cfg.max_pixels)
        torch.manual_seed(cfg.seed)
        httpd.worker = Worker(net, processor, cfg)
    except BaseException:
        httpd.server_close()
        raise
    httpd.worker.start()
    return httpd, httpd.worker

def serve_command(cfg: ServeConfig) -> None:
    """Serve until Ctrl-C or SIGTERM."""
    httpd, worker = make_server(cfg)
    host, port = httpd.server_address[:2]
    if cfg.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {cfg.host}: there is no authentication; anyone who can reach it can use "
              f"the model{' and read images under ' + cfg.image_root if cfg.image_root else ''}", file=sys.stderr)
    if threading.current_thread() is threading.main_thread():  # SIGTERM: the same clean exit as Ctrl-C
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    print(f"serving {cfg.model}{' + ' + cfg.adapter if cfg.adapter else ''} as '{cfg.served_model_name}' on "
          f"http://{host}:{port}/v1 (POST /v1/chat/completions, GET /v1/models, GET /health)", flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
        worker.stop()
