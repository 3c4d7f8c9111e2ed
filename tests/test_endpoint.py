"""endpoint.py: the client for OpenAI-compatible endpoints, against a local server that is busy at first."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import endpoint


def test_a_busy_endpoint_is_retried_after_its_retry_after(monkeypatch):
    calls = []

    class Busy(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            calls.append(self.path)
            busy = len(calls) <= 2
            body = json.dumps({"error": {"message": "queue full"}} if busy else
                              {"choices": [{"message": {"content": "ok"}}]}).encode()
            self.send_response(503 if busy else 200)
            if busy:
                self.send_header("Retry-After", "0")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Busy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert endpoint.chat_completion(url, [{"role": "user", "content": "hi"}]) == "ok" and len(calls) == 3
        calls.clear()
        monkeypatch.setattr(endpoint, "BUSY_RETRIES", 1)  # still busy after the last retry: the call fails
        with pytest.raises(endpoint.EndpointError, match="HTTP 503"):
            endpoint.chat_completion(url, [{"role": "user", "content": "hi"}])
    finally:
        server.shutdown()
    assert endpoint.retry_after("3", 0) == 3 and endpoint.retry_after(None, 2) == 4 and endpoint.retry_after("soon", 9) == 30


# --------------------------------------------------------------------------------------------
# A request read as upstream's server (LLaMA-Factory's API) reads it.

def _body(content, **fields):
    return json.dumps({"model": "visrl", "messages": [{"role": "user", "content": content}], **fields}).encode()


def _image_part(color):
    from PIL import Image

    return {"type": "image_url", "image_url": {"url": endpoint.image_data_url(Image.new("RGB", (40, 30), color))}}


@pytest.fixture(scope="module")
def image_processor():
    import model

    return model.load_processor("tiny").image_processor


def _read(content, image_processor, **settings):
    import serve

    return endpoint.parse_chat_request(_body(content), serve.ServeConfig(**settings), image_processor)


def test_a_request_without_sampling_fields_gets_upstream_servers_defaults(image_processor):
    # LLaMA-Factory hparams/generating_args.py l.27-72: temperature 0.95, top_p 0.7, top_k 50
    request = _read("hello", image_processor)
    assert (request.sampling.temperature, request.sampling.top_p, request.sampling.top_k) == (0.95, 0.7, 50)
    request = _read("hello", image_processor, sampling_defaults="openai")
    assert (request.sampling.temperature, request.sampling.top_p, request.sampling.top_k) == (1.0, 1.0, 0)


def test_image_placeholders_say_where_the_images_go(image_processor):
    # upstream's data_gen/generate.py asks the answer as [full image, prompt + '\n<image>', crop], its prompt starting
    # with '<image>\n': each image fills a placeholder, in order (chat/hf_engine.py l.89-90)
    content = [_image_part("red"), {"type": "text", "text": "<image>\nWhat is inside?\n<image>"}, _image_part("blue")]
    request = _read(content, image_processor)
    assert request.messages[0]["content"] == [{"type": "image"}, {"type": "text", "text": "\nWhat is inside?\n"},
                                              {"type": "image"}]
    assert [im.getpixel((0, 0)) for im in request.images] == [(255, 0, 0), (0, 0, 255)]
    with pytest.raises(endpoint.RequestError, match="1 <image> placeholders in the text for 2 images"):
        _read([_image_part("red"), {"type": "text", "text": "<image> one"}, _image_part("blue")], image_processor)


def test_without_placeholders_images_stay_in_place_or_go_first_as_upstream(image_processor):
    # upstream's extras/test_cot.py l.117-123 asks the answer as [image, question, crop]; its server puts both images
    # before the text ('<image><image>' + question); visrl's default keeps the parts where they are
    content = [_image_part("red"), {"type": "text", "text": "What is inside?"}, _image_part("blue")]
    kinds = lambda r: [p["type"] for p in r.messages[0]["content"]]  # noqa: E731
    assert kinds(_read(content, image_processor)) == ["image", "text", "image"]
    upstream = _read(content, image_processor, image_order="upstream")
    assert kinds(upstream) == ["image", "image", "text"] and upstream.messages[0]["content"][2]["text"] == \
        "What is inside?"
    assert [im.getpixel((0, 0)) for im in upstream.images] == [(255, 0, 0), (0, 0, 255)]
