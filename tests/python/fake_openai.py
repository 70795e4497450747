"""A scripted OpenAI-compatible chat endpoint for tests of the llm policy
(policies/llm.c): an http.server on 127.0.0.1 that answers
POST /v1/chat/completions with the next reply of a script and records every
request it got (path, headers, JSON body).

Not a model: replies are canned, whatever the request says. A request past
the end of the script gets HTTP 400 ("no scripted reply"), which the policy
does not retry, so a test sees an unexpected extra turn as a failed run.
"""
import http.server
import json
import threading
from typing import Any, Dict, List, Optional


def tool_call(call_id: Optional[str], name: Optional[str], arguments: Any) -> Dict[str, Any]:
    """One tool call of an assistant message; arguments: a dict (sent as JSON
    text) or the raw string the model would have produced."""
    fn: Dict[str, Any] = {"arguments": arguments if isinstance(arguments, str)
                          else json.dumps(arguments)}
    if name is not None:
        fn["name"] = name
    call: Dict[str, Any] = {"type": "function", "function": fn}
    if call_id is not None:
        call["id"] = call_id
    return call


def completion(content: Optional[str] = None, calls: Optional[List[Dict[str, Any]]] = None,
               usage: Optional[int] = None) -> Dict[str, Any]:
    """A 200 reply: an assistant message with content and/or tool calls;
    usage: total_tokens to report (None: no usage field)."""
    message: Dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = calls
    body: Dict[str, Any] = {
        "id": "chatcmpl-fake", "object": "chat.completion", "model": "fake",
        "choices": [{"index": 0, "message": message,
                     "finish_reason": "tool_calls" if calls else "stop"}]}
    if usage is not None:
        body["usage"] = {"prompt_tokens": usage - usage // 4, "completion_tokens": usage // 4,
                         "total_tokens": usage}
    return {"status": 200, "body": body}


def error(status: int, message: str, headers: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """An error reply in OpenAI's shape: {"error": {"message", "type"}}."""
    return {"status": status, "headers": headers or {},
            "body": {"error": {"message": message, "type": "fake_error"}}}


class FakeOpenAI:
    """Serves the script on 127.0.0.1 (a free port) until stopped; use as a
    context manager. `requests` lists what came in: {path, headers, body}."""

    def __init__(self, script: List[Dict[str, Any]]):
        self.script = list(script)
        self.requests: List[Dict[str, Any]] = []
        self._lock = threading.Lock()
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = raw.decode("utf-8", "replace")
                with fake._lock:
                    n = len(fake.requests)
                    fake.requests.append({"path": self.path, "headers": dict(self.headers),
                                          "body": body})
                    reply = (fake.script[n] if n < len(fake.script)
                             else error(400, f"fake_openai: no scripted reply for request {n}"))
                if self.path != "/v1/chat/completions":
                    reply = error(404, f"fake_openai: no route {self.path}")
                data = json.dumps(reply["body"]).encode()
                self.send_response(reply["status"])
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in reply.get("headers", {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, fmt: str, *args: Any) -> None:
                pass  # quiet

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeOpenAI":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
