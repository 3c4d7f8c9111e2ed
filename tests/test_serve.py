"""serve.py: `infer` on one image, and the OpenAI-compatible server over real HTTP on localhost."""

import base64
import contextlib
import http.client
import io
import json
import socket
import struct
import threading
import time
import zlib

import pytest
from PIL import Image, ImageDraw

import chat
import data
import endpoint
import evaluate
import model
import serve
import viscot

QUESTION = "What digit is inside the red frame?"
MAX_TOKENS = 12



def stop_server(httpd, worker) -> None:
    """Stop accepting (serve_forever runs in another thread), close the socket, finish queued jobs."""
    httpd.shutdown()
    httpd.server_close()
    worker.stop()

def _picture(size=(320, 240)):
    im = Image.new("RGB", size, (235, 235, 235))
    draw = ImageDraw.Draw(im)
    draw.rectangle((40, 30, 120, 110), outline=(220, 0, 0), width=4)
    draw.text((70, 60), "7", fill=(0, 0, 0))
    return im


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """--image-root with one picture; a second picture outside it, and a symlink from inside to it."""
    base = tmp_path_factory.mktemp("serve")
    (base / "root" / "sub").mkdir(parents=True)
    _picture().save(base / "root" / "sub" / "a.png")
    (base / "outside").mkdir()
    _picture().save(base / "outside" / "b.png")
    (base / "root" / "link.png").symlink_to(base / "outside" / "b.png")
    (base / "root" / "broken.png").write_bytes(b"not a png at all")
    (base / "root" / "loop.png").symlink_to("loop.png")
    return base / "root"


@pytest.fixture(scope="module")
def reference(tiny_path):
    """A second copy of the tiny model for direct model.sample calls (the server's belongs to its worker)."""
    return model.load_model(str(tiny_path))


def _generate(reference, prompts, max_tokens=MAX_TOKENS):
    net, processor = reference
    return model.sample(net, processor, prompts, model.Sampling(max_new_tokens=max_tokens))


@pytest.fixture(scope="module")
def server(tiny_path, root):
    cfg = serve.ServeConfig(model=str(tiny_path), port=0, image_root=str(root), max_body_bytes=2_000_000,
                            max_image_pixels=1000 * 1000, max_images_per_request=2, max_new_tokens_limit=64,
                            max_prompt_tokens=600, batch_size=8)
    httpd, worker = serve.make_server(cfg)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", worker
    stop_server(httpd, worker)
    thread.join(timeout=10)
    assert not worker.is_alive()


def _call(url, method="GET", path="/health", body=None, headers=None, raw=None, reply_headers=False):
    """(status, parsed JSON[, reply headers]) of one request; raw bytes go out as they are."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    payload = raw if raw is not None else None if body is None else json.dumps(body).encode()
    conn.request(method, path, body=payload, headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    status, text = response.status, response.read()
    conn.close()
    return (status, json.loads(text), dict(response.getheaders())) if reply_headers else (status, json.loads(text))


@contextlib.contextmanager
def _own_server(reference, **settings):
    """A server on the reference model with these ServeConfig settings; yields (url, worker)."""
    net, processor = reference
    httpd, worker = serve.make_server(serve.ServeConfig(port=0, max_new_tokens_limit=MAX_TOKENS, **settings),
                                      net, processor)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", worker
    finally:
        stop_server(httpd, worker)
        thread.join(timeout=10)


def _wait_for(condition, seconds=20):
    """Poll until condition() holds or the seconds pass (the caller asserts what it needs)."""
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)


def _request(url_or_path, question=QUESTION, **extra):
    return {"model": "visrl", "max_tokens": MAX_TOKENS, "temperature": 0.0, **extra, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url_or_path}},
                                     {"type": "text", "text": question}]}]}


def _ours(question=QUESTION):
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def _chat(url, body):
    status, reply = _call(url, "POST", "/v1/chat/completions", body)
    assert status == 200, reply
    return reply


# --------------------------------------------------------------------------------------------
# infer (evaluate.py: two_step on one image and its picture; here beside serve, which shares its fixtures)


def test_infer_writes_its_picture_and_agrees_with_evaluate(tiny_path, root, reference, tmp_path, capsys):
    image_path = root / "sub" / "a.png"
    cfg = evaluate.InferConfig(image=str(image_path), question=QUESTION, model=str(tiny_path),
                            out=str(tmp_path / "pic" / "infer.png"), max_new_tokens=MAX_TOKENS)
    row = evaluate.infer_command(cfg)
    with Image.open(tmp_path / "pic" / "infer.png") as pic:
        assert pic.width > 320 and pic.height > 240  # the image, the crop beside it, the caption
    assert {"box_text", "box", "box_parsed", "crop", "answer"} <= set(row) and row["crop"][2] > row["crop"][0]
    assert row["box_parsed"] == (row["box"] is not None)
    printed = capsys.readouterr().out
    assert f"box text: {row['box_text']}" in printed and f"answer: {row['answer']}" in printed
    # the shared two-step function gives evaluate.predict_batch's row for the same item
    item = viscot.Item(set="t", id="0", image=str(image_path), question=QUESTION, answers=[], gt_box=None,
                          width=320, height=240)
    expected = evaluate.predict_batch([item], lambda prompts: _generate(reference, prompts))[0]
    assert {k: row[k] for k in ("box_text", "box", "crop", "answer")} == {
        k: expected[k] for k in ("box_text", "box", "crop", "answer")}


def test_infer_names_a_missing_or_corrupt_image(root):
    for path in (root / "nope.png", root / "broken.png"):
        with pytest.raises(data.DataError, match=str(path)):
            evaluate.infer_command(evaluate.InferConfig(image=str(path), question="q"))


def test_infer_refuses_to_overwrite_unless_asked_and_never_its_input(tiny_path, root, tmp_path):
    image = root / "sub" / "a.png"
    before = image.read_bytes()
    for out, overwrite in ((image, False), (image, True), (root / "sub" / ".." / "sub" / "a.png", True)):
        with pytest.raises(data.UserError, match="is the input image"):
            evaluate.infer_command(evaluate.InferConfig(image=str(image), question="q", out=str(out), overwrite=overwrite))
    assert image.read_bytes() == before
    taken = tmp_path / "taken.png"
    taken.write_bytes(b"mine")
    with pytest.raises(data.UserError, match="--overwrite"):  # refused before the model loads
        evaluate.infer_command(evaluate.InferConfig(image=str(image), question="q", out=str(taken)))
    assert taken.read_bytes() == b"mine"
    evaluate.infer_command(evaluate.InferConfig(image=str(image), question="q", model=str(tiny_path), out=str(taken),
                                          overwrite=True, max_new_tokens=2))
    with Image.open(taken) as pic:
        assert pic.width > 320


def test_serve_refuses_a_bad_image_root_or_a_taken_port_with_a_user_error(tmp_path):
    (tmp_path / "file.png").write_bytes(b"x")
    with socket.socket() as taken:  # taken: a check that went missing fails here instead of serving forever
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for bad in (tmp_path / "nope", tmp_path / "file.png"):
            with pytest.raises(data.UserError, match=r"^--image-root .*: no such directory$"):
                serve.serve_command(serve.ServeConfig(image_root=str(bad), port=port))
        with pytest.raises(data.UserError, match=f"^cannot listen on 127.0.0.1:{port}: Address already in use$"):
            serve.serve_command(serve.ServeConfig(port=port))  # raised before the model would load


def test_cli_flags_parse():
    import tyro

    cfg = tyro.cli(serve.ServeConfig, args=["--port", "0", "--image-root", "/x", "--max-queue", "3",
                                            "--served-model-name", "m", "--batch-size", "2"])
    assert (cfg.port, cfg.image_root, cfg.max_queue, cfg.served_model_name, cfg.batch_size, cfg.host) == (
        0, "/x", 3, "m", 2, "127.0.0.1")
    cfg = tyro.cli(evaluate.InferConfig, args=["--image", "a.png", "--question", "q?", "--crop", "raw"])
    assert (cfg.image, cfg.question, cfg.crop, cfg.out, cfg.overwrite) == ("a.png", "q?", "raw", "infer.png", False)
    assert tyro.cli(evaluate.InferConfig, args=["--image", "a", "--question", "q", "--overwrite"]).overwrite
    assert tyro.cli(serve.ServeConfig, args=["--body-timeout", "2.5"]).body_timeout == 2.5


# --------------------------------------------------------------------------------------------
# the server


def test_health_and_models(server):
    url, _ = server
    assert _call(url) == (200, {"status": "ok"})
    status, models = _call(url, path="/v1/models")
    assert status == 200 and models["object"] == "list" and [m["id"] for m in models["data"]] == ["visrl"]


def test_reply_is_model_generate_output_with_openai_shape(server, reference):
    url, _ = server
    image = _picture()
    reply = _chat(url, _request(endpoint.image_data_url(image)))
    assert reply["object"] == "chat.completion" and reply["id"].startswith("chatcmpl-") and reply["model"] == "visrl"
    (choice,) = reply["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == _generate(reference, [(_ours(), [image])])[0]  # nothing added
    net, processor = reference
    prompt = len(chat.encode(processor.tokenizer, processor.image_processor, _ours(), [image.size])[0])
    usage = reply["usage"]
    assert usage["prompt_tokens"] == prompt and 1 <= usage["completion_tokens"] <= MAX_TOKENS
    assert usage["total_tokens"] == prompt + usage["completion_tokens"]
    assert choice["finish_reason"] == ("length" if usage["completion_tokens"] == MAX_TOKENS else "stop")
    # text only, a system prompt and an earlier turn: rendered as render_chat renders our messages
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello."}, {"role": "user", "content": [{"type": "text", "text": "Count."}]}]
    reply = _chat(url, {"messages": turns, "max_completion_tokens": 5, "temperature": 0})
    expected = _generate(reference, [(turns[:3] + [{"role": "user", "content": [{"type": "text", "text": "Count."}]}], [])], 5)
    assert reply["choices"][0]["message"]["content"] == expected[0]


def test_a_path_under_the_image_root_equals_the_data_url(server, root):
    url, _ = server
    expected = _chat(url, _request(endpoint.image_data_url(_picture())))["choices"][0]["message"]["content"]
    for ref in ("sub/a.png", str(root / "sub" / "a.png"), (root / "sub" / "a.png").as_uri(), "sub/../sub/a.png"):
        assert _chat(url, _request(ref))["choices"][0]["message"]["content"] == expected, ref


def test_concurrent_requests_are_batched_and_each_equals_its_single_answer(server, reference):
    url, worker = server
    image = _picture()
    questions = [QUESTION, "Which number?", "What colour is the frame around the digit in the picture?",
                 "Is there a digit?", "Where is the red square?", "Read it."]
    expected = [_generate(reference, [(_ours(q), [image])])[0] for q in questions]
    replies = [None] * len(questions)

    def ask(i):
        replies[i] = _chat(url, _request(endpoint.image_data_url(image), questions[i]))["choices"][0]["message"]["content"]

    with worker.model_lock:  # hold the model so that all six queue up and go in one batch
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(questions))]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        while worker.pending() < len(questions) and time.monotonic() < deadline:
            time.sleep(0.01)
    for t in threads:
        t.join(timeout=60)
    assert replies == expected
    assert worker.batch_sizes[-1] == len(questions)


def _tall_png_header(width, height):
    """A PNG whose header claims width x height over a few bytes of pixel data (a decompression bomb's shape)."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    raw = bytearray(buffer.getvalue())
    raw[16:24] = struct.pack(">II", width, height)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))
    return "data:image/png;base64," + base64.b64encode(bytes(raw)).decode()


def _errors(root):
    good = endpoint.image_data_url(_picture())
    two_images = _request(good)
    two_images["messages"][0]["content"] += [{"type": "image_url", "image_url": {"url": good}}] * 2
    return {
        "bad json": (400, "bad_json", dict(method="POST", path="/v1/chat/completions", raw=b"{not json")),
        "not an object": (400, "bad_json", dict(method="POST", path="/v1/chat/completions", body=[1, 2])),
        "bad base64": (400, "bad_base64", dict(method="POST", path="/v1/chat/completions",
                                               body=_request("data:image/png;base64,@@@not base64@@@"))),
        "undecodable image": (400, "bad_image", dict(method="POST", path="/v1/chat/completions",
                                                     body=_request("data:image/png;base64," + base64.b64encode(b"hello").decode()))),
        "corrupt file": (400, "bad_image", dict(method="POST", path="/v1/chat/completions", body=_request("broken.png"))),
        "dotdot outside root": (403, "path_outside_image_root", dict(method="POST", path="/v1/chat/completions",
                                                                     body=_request("../outside/b.png"))),
        "absolute outside root": (403, "path_outside_image_root", dict(method="POST", path="/v1/chat/completions",
                                                                       body=_request(str(root.parent / "outside" / "b.png")))),
        "symlink outside root": (403, "path_outside_image_root", dict(method="POST", path="/v1/chat/completions",
                                                                      body=_request("link.png"))),
        "NUL byte in a file URL": (400, "bad_image_path", dict(method="POST", path="/v1/chat/completions",
                                                               body=_request((root / "sub").as_uri() + "/a%00.png"))),
        "NUL byte in the JSON": (400, "bad_image_path", dict(method="POST", path="/v1/chat/completions",
                                                             body=_request("sub/a\u0000.png"))),
        "a 300-char name": (400, "bad_image_path", dict(method="POST", path="/v1/chat/completions",
                                                        body=_request("sub/" + "x" * 300 + ".png"))),
        "a lone surrogate": (400, "bad_image_path", dict(method="POST", path="/v1/chat/completions",
                                                         body=_request("sub/\ud800.png"))),
        "a symlink loop": (400, "bad_image_path", dict(method="POST", path="/v1/chat/completions",
                                                       body=_request("loop.png"))),
        "missing file": (404, "image_not_found", dict(method="POST", path="/v1/chat/completions", body=_request("sub/nope.png"))),
        "remote url": (400, "bad_image_url", dict(method="POST", path="/v1/chat/completions",
                                                  body=_request("https://example.com/a.png"))),
        "over the pixel limit": (413, "image_too_large", dict(method="POST", path="/v1/chat/completions",
                                                              body=_request(_tall_png_header(3000, 3000)))),
        "over PIL's bomb limit": (413, "image_too_large", dict(method="POST", path="/v1/chat/completions",
                                                               body=_request(_tall_png_header(30000, 30000)))),
        "too many images": (400, "too_many_images", dict(method="POST", path="/v1/chat/completions", body=two_images)),
        "stream": (400, "stream_unsupported", dict(method="POST", path="/v1/chat/completions", body=_request(good, stream=True))),
        "n=2": (400, "bad_field", dict(method="POST", path="/v1/chat/completions", body=_request(good, n=2))),
        "max_tokens over the cap": (400, "bad_field", dict(method="POST", path="/v1/chat/completions",
                                                           body=_request(good, max_tokens=65))),
        "temperature NaN": (400, "bad_field", dict(method="POST", path="/v1/chat/completions",
                                                                            raw=json.dumps(_request(good)).replace(
                                                                                '"temperature": 0.0', '"temperature": NaN').encode())),
        "bad role": (400, "bad_field", dict(method="POST", path="/v1/chat/completions",
                                            body={"messages": [{"role": "robot", "content": "hi"}]})),
        "vision token in text": (400, "bad_field", dict(method="POST", path="/v1/chat/completions",
                                                        body=_request(good, question="<|image_pad|> hi"))),
        "prompt too long": (400, "context_length_exceeded", dict(method="POST", path="/v1/chat/completions",
                                                                 body=_request(good, question="red green blue " * 300))),
        "visual_cot without an image": (400, "bad_field", dict(method="POST", path="/v1/chat/completions",
                                                               body={"messages": [{"role": "user", "content": "hi"}],
                                                                     "visual_cot": True})),
        "unknown route": (404, "not_found", dict(method="GET", path="/v1/nothing")),
        "wrong method": (405, "method_not_allowed", dict(method="GET", path="/v1/chat/completions")),
        "post on health": (405, "method_not_allowed", dict(method="POST", path="/health", body={})),
    }


def test_each_bad_request_gets_an_error_json_and_the_server_keeps_serving(server, root, reference):
    url, _ = server
    good = _request(endpoint.image_data_url(_picture()))
    expected = _generate(reference, [(_ours(), [_picture()])])[0]
    for name, (status, code, request) in _errors(root).items():
        got, body = _call(url, **request)
        assert (got, body["error"]["code"]) == (status, code), (name, body)
        assert set(body["error"]) == {"message", "type", "code"} and body["error"]["message"], name
        if str(root.parent) not in str(request):  # no server path, unless the client sent it
            assert str(root.parent) not in json.dumps(body) and str(root.parent.resolve()) not in json.dumps(body), name
        if name == "over the pixel limit":  # refused by our check on the header's size, before decoding
            assert "3000x3000" in body["error"]["message"] and "--max-image-pixels" in body["error"]["message"]
        assert _call(url) == (200, {"status": "ok"}), name
        assert _chat(url, good)["choices"][0]["message"]["content"] == expected, name


def _headers_only(url, headers):
    """Send a POST's headers and no body; the server must answer from the headers alone."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("POST", "/v1/chat/completions")
    for key, value in headers.items():
        conn.putheader(key, value)
    conn.endheaders()
    response = conn.getresponse()
    status, body = response.status, json.loads(response.read())
    conn.close()
    return status, body


def test_body_over_the_limit_or_without_length_is_refused_unread(server):
    url, _ = server
    status, body = _headers_only(url, {"Content-Length": str(2_000_001), "Content-Type": "application/json"})
    assert (status, body["error"]["code"]) == (413, "body_too_large")
    status, body = _headers_only(url, {"Content-Type": "application/json"})
    assert (status, body["error"]["code"]) == (411, "length_required")
    # a client that sends the whole body before reading still gets the 413 (the refused body is drained)
    status, body = _call(url, "POST", "/v1/chat/completions", raw=b" " * 3_000_000)
    assert (status, body["error"]["code"]) == (413, "body_too_large")
    assert _call(url) == (200, {"status": "ok"})


def test_a_failing_generation_is_a_500_for_that_request_only(server, root, reference, monkeypatch):
    url, worker = server
    real = model.sample

    def flaky(net, processor, prompts, *args, **kwargs):
        if any("BOOM" in json.dumps(messages) for messages, _ in prompts):
            raise RuntimeError(f"boom in {root}/weights.bin")  # the server's paths stay in its log
        return real(net, processor, prompts, *args, **kwargs)

    monkeypatch.setattr(serve.model, "sample", flaky)
    image = _picture()
    results = {}

    def ask(question):
        results[question] = _call(url, "POST", "/v1/chat/completions", _request(endpoint.image_data_url(image), question))

    with worker.model_lock:  # both in one batch: the batch fails, then each runs alone
        threads = [threading.Thread(target=ask, args=(q,)) for q in ("BOOM", QUESTION)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        while worker.pending() < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    for t in threads:
        t.join(timeout=60)
    assert results["BOOM"][0] == 500 and results["BOOM"][1]["error"]["code"] == "generation_failed"
    assert "RuntimeError" in results["BOOM"][1]["error"]["message"] and str(root) not in json.dumps(results["BOOM"])
    assert results[QUESTION][0] == 200
    assert results[QUESTION][1]["choices"][0]["message"]["content"] == _generate(reference, [(_ours(), [image])])[0]


def test_visual_cot_returns_the_box_and_the_answer(server, reference):
    url, _ = server
    image = _picture()
    reply = _chat(url, _request(endpoint.image_data_url(image), visual_cot=True))
    cot = reply["visual_cot"]
    assert set(cot) == {"box_text", "box", "crop"} and len(cot["crop"]) == 4
    expected = chat.two_step(lambda prompts: _generate(reference, prompts), [image], [chat.focus_messages(QUESTION)],
                                [QUESTION])[0]
    assert cot == {k: expected[k] for k in ("box_text", "box", "crop")}
    assert reply["choices"][0]["message"]["content"] == expected["answer"]
    assert reply["usage"]["completion_tokens"] >= 2  # both steps counted


def test_seeded_sampling_repeats(server):
    url, _ = server
    body = _request(endpoint.image_data_url(_picture()), temperature=1.5, top_p=0.9, seed=7)
    first, second = (_chat(url, body)["choices"][0]["message"]["content"] for _ in range(2))
    assert first == second


def test_our_openai_client_works_against_the_server(server, root, reference):
    url, _ = server
    image = _picture()
    messages = endpoint.to_openai_messages(_ours(), [image])
    assert endpoint.chat_completion(url, messages, model="visrl", max_tokens=MAX_TOKENS) == \
        _generate(reference, [(_ours(), [image])])[0]
    # a whole two-step prediction through the endpoint equals the in-process one
    item = viscot.Item(set="t", id="0", image=str(root / "sub" / "a.png"), question=QUESTION, answers=["7"],
                          gt_box=[40, 30, 120, 110], width=320, height=240)
    remote = evaluate.reply_function(evaluate.EvalConfig(endpoint=url, max_new_tokens=MAX_TOKENS, batch_size=2))
    assert evaluate.predict_batch([item, item], remote) == \
        evaluate.predict_batch([item, item], lambda prompts: _generate(reference, prompts))


def _distinct(i):
    """Request i of a burst: its own picture (frame, digit, colour) and its own question; all the same size."""
    im = Image.new("RGB", (160, 120), (200 + i % 5 * 10, 230, 235 - i % 7 * 10))
    draw = ImageDraw.Draw(im)
    draw.rectangle((4 + i % 8 * 12, 6 + i // 8 * 10, 50 + i % 8 * 12, 40 + i // 8 * 10), outline=(220, 0, 4 * i), width=3)
    draw.text((20 + i % 8 * 12, 15 + i // 8 * 10), str(i % 10), fill=(0, 0, 0))
    return _request(endpoint.image_data_url(im), f"Question {i}: what digit is inside the frame?")


def _burst(url, bodies, results=None, seconds=60):
    """Send all bodies at once, one connection each; fills results with (status, body, headers) or the
    exception, per request."""
    results, go = [None] * len(bodies) if results is None else results, threading.Barrier(len(bodies))

    def ask(i):
        go.wait(timeout=seconds)
        try:
            results[i] = _call(url, "POST", "/v1/chat/completions", bodies[i], reply_headers=True)
        except Exception as e:  # a reset or a timeout: the test reports it
            results[i] = e

    threads = [threading.Thread(target=ask, args=(i,), daemon=True) for i in range(len(bodies))]
    for t in threads:
        t.start()
    end = time.monotonic() + seconds
    for t in threads:
        t.join(timeout=max(0.0, end - time.monotonic()))
    return results


def test_64_concurrent_distinct_requests_each_get_their_own_single_answer(server):
    url, worker = server  # --max-queue 64: all are accepted
    assert serve.Server.request_queue_size >= 128
    bodies = [_distinct(i) for i in range(64)]
    alone = [_chat(url, body) for body in bodies]
    key = [(r["choices"][0]["message"], r["choices"][0]["finish_reason"], r["usage"]) for r in alone]
    assert len({json.dumps(k) for k in key}) > 1  # the answers differ, so a swapped reply would show
    for burst in range(3):
        results = _burst(url, bodies)
        for i, result in enumerate(results):
            assert isinstance(result, tuple) and result[0] == 200, (burst, i, result)
            choice = result[1]["choices"][0]
            assert (choice["message"], choice["finish_reason"], result[1]["usage"]) == key[i], (burst, i)
        assert max(list(worker.batch_sizes)[-8:]) > 1  # they were batched


def test_a_full_queue_is_a_503_with_retry_after_and_paths_need_an_image_root(reference):
    with _own_server(reference, max_queue=2) as (url, worker):  # no --image-root
        status, body = _call(url, "POST", "/v1/chat/completions", _request("a.png"))
        assert (status, body["error"]["code"]) == (403, "image_paths_disabled")
        bodies = [_distinct(i) for i in range(10)]
        with worker.model_lock:  # the two slots stay taken while the model is held
            results = [None] * len(bodies)
            thread = threading.Thread(target=_burst, args=(url, bodies, results), daemon=True)
            thread.start()
            _wait_for(lambda: sum(r is not None for r in results) == 8)  # the other two are waiting
            assert _call(url) == (200, {"status": "ok"})  # GETs need no slot
        thread.join(timeout=60)
    assert all(isinstance(r, tuple) for r in results), results  # answered, never reset
    assert sorted(r[0] for r in results) == [200] * 2 + [503] * 8  # the queued ones are answered, not dropped
    for status, body, headers in results:
        if status == 503:
            assert body["error"]["code"] == "server_busy" and headers["Retry-After"].isdigit()


def test_a_slow_body_holds_no_slot_and_times_out(reference):
    with _own_server(reference, max_queue=1, body_timeout=3.0) as (url, _):
        good = _request(endpoint.image_data_url(_picture()))
        assert _call(url, "POST", "/v1/chat/completions", good)[0] == 200  # warm
        slow = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=1.0)
        slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{")
        start = time.monotonic()
        # the one slot is free for a normal request, answered at once
        assert _call(url, "POST", "/v1/chat/completions", good)[0] == 200
        assert time.monotonic() - start < 2.0
        reply = b""
        while time.monotonic() - start < 15:  # one byte a second until the server answers or closes
            try:
                chunk = slow.recv(65536)
            except TimeoutError:
                slow.sendall(b" ")
                continue
            except ConnectionResetError:
                break
            if not chunk:
                break
            reply += chunk
        slow.close()
        assert 2.9 < time.monotonic() - start < 6
        assert reply == b"" or (reply.startswith(b"HTTP/1.0 408") and b'"code": "timeout"' in reply), reply
        assert _call(url, "POST", "/v1/chat/completions", good)[0] == 200  # its slot was never taken
