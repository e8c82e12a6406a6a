"""The ``vllm-lora-ext`` command line against a loopback server that records what it receives.

``adapters add`` sends only an adapter's files and nothing at all for a folder it refuses;
every option is accepted before and after a subcommand's action; no input and no server answer
ends in a traceback (one line on stderr and an exit code from the shared table).
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vllm_lora_ext.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE
from vllm_lora_ext.cli import build_parser, main
from vllm_lora_ext.cli.client import Exit

# -- a loopback server that records every request --------------------------------------------


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def form(self) -> tuple[dict[str, str], dict[str, bytes]]:
        """A multipart body's fields and files (file name -> content)."""
        head = f"Content-Type: {self.headers['content-type']}\r\n\r\n".encode()
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + self.body)
        fields, files = {}, {}
        for part in message.iter_parts():
            payload = part.get_payload(decode=True)
            if part.get_filename() is not None:
                files[part.get_filename()] = payload
            else:
                fields[part.get_param("name", header="content-disposition")] = payload.decode()
        return fields, files


@dataclass
class Recorder:
    url: str
    received: list[Received] = field(default_factory=list)
    answer: tuple[int, bytes, str] | None = None
    """(status, body, content type) for every request; None: a plausible answer per route."""


def _default_answer(method: str, path: str) -> tuple[int, bytes, str]:
    if method == "POST" and path == "/v1/adapters":
        return 201, b'{"name": "x", "loaded": true}', "application/json"
    if method == "GET" and path == "/v1/adapters":
        return 200, b'{"base": "tiny", "adapters": []}', "application/json"
    return 200, b'{"deleted": "x"}', "application/json"


@pytest.fixture(scope="module")
def loopback() -> Iterator[Recorder]:
    recorder = Recorder(url="")

    class Handler(BaseHTTPRequestHandler):
        def _handle(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length)
            headers = {k.lower(): v for k, v in self.headers.items()}
            recorder.received.append(Received(self.command, self.path, headers, body))
            status, content, kind = recorder.answer or _default_answer(self.command, self.path)
            self.send_response(status)
            self.send_header("content-type", kind)
            self.send_header("content-length", str(len(content)))
            self.end_headers()
            self.wfile.write(content)

        do_GET = do_POST = do_DELETE = _handle

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    recorder.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield recorder
    server.shutdown()
    server.server_close()


@pytest.fixture
def server(loopback: Recorder) -> Recorder:
    loopback.received.clear()
    loopback.answer = None
    return loopback


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def adapter_folder(path: Path) -> Path:
    """The two required files (not a valid adapter: this server does not look)."""
    path.mkdir(parents=True)
    (path / CONFIG_FILE).write_text('{"peft_type": "LORA", "r": 8}')
    (path / WEIGHTS_FILE).write_bytes(b"weights-" + bytes(range(256)) * 64)
    return path


# -- adapters add: what is sent ----------------------------------------------------------------


def test_add_sends_the_adapter_files_and_nothing_else(server, tmp_path, capsys):
    folder = adapter_folder(tmp_path / "ad")
    (folder / "README.md").write_text("# card")
    (folder / "card.json").write_text("{}")
    for stray in (".env", "notes.txt", "optimizer.pt", "training_args.bin", "model.safetensors"):
        (folder / stray).write_bytes(b"SECRET")
    (folder / "checkpoint-10").mkdir()
    (folder / "checkpoint-10" / WEIGHTS_FILE).write_bytes(b"SECRET")
    (folder / "weights.safetensors").write_bytes(b"W")
    (folder / "link.json").symlink_to("/etc/hostname")  # not an adapter file: never read

    code, out, err = run_cli(capsys, "adapters", "add", "ad", str(folder), "--url", server.url)
    assert code == Exit.OK, err
    assert json.loads(out)["name"] == "x"
    (request,) = server.received
    assert (request.method, request.path) == ("POST", "/v1/adapters")
    fields, files = request.form()
    assert fields == {"name": "ad"}
    assert files == {
        n: (folder / n).read_bytes() for n in (CONFIG_FILE, WEIGHTS_FILE, "README.md", "card.json")
    }
    assert b"SECRET" not in request.body


def test_a_link_inside_the_folder_is_followed(server, tmp_path, capsys):
    folder = adapter_folder(tmp_path / "ad")
    (folder / "v2").mkdir()
    (folder / WEIGHTS_FILE).rename(folder / "v2" / "w.safetensors")
    (folder / WEIGHTS_FILE).symlink_to(Path("v2") / "w.safetensors")
    code, _, err = run_cli(capsys, "adapters", "--url", server.url, "add", "ad", str(folder))
    assert code == Exit.OK, err
    (request,) = server.received
    assert request.form()[1][WEIGHTS_FILE] == (folder / "v2" / "w.safetensors").read_bytes()


def _missing_weights(folder: Path, outside: Path) -> None:
    (folder / WEIGHTS_FILE).unlink()


def _like_etc(folder: Path, outside: Path) -> None:
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        (folder / name).unlink()
    (folder / "passwd").write_text("root:x:0:0")
    (folder / "hostname").write_text("box")


def _pickle_beside(folder: Path, outside: Path) -> None:
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04pickle")


def _pickle_only(folder: Path, outside: Path) -> None:
    (folder / WEIGHTS_FILE).unlink()
    (folder / "adapter_model.pt").write_bytes(b"\x80\x04pickle")


def _weights_link_out(folder: Path, outside: Path) -> None:
    (folder / WEIGHTS_FILE).unlink()
    (folder / WEIGHTS_FILE).symlink_to(outside)


def _readme_link_out(folder: Path, outside: Path) -> None:
    (folder / "README.md").symlink_to(outside)


def _relative_link_out(folder: Path, outside: Path) -> None:
    (folder / CONFIG_FILE).unlink()
    (folder / CONFIG_FILE).symlink_to(Path("..") / outside.name)


def _dangling_link(folder: Path, outside: Path) -> None:
    (folder / WEIGHTS_FILE).unlink()
    (folder / WEIGHTS_FILE).symlink_to("gone.safetensors")


def _weights_a_folder(folder: Path, outside: Path) -> None:
    (folder / WEIGHTS_FILE).unlink()
    (folder / WEIGHTS_FILE).mkdir()


@pytest.mark.parametrize(
    ("fault", "says"),
    [
        (_missing_weights, f"no {WEIGHTS_FILE}"),
        (_like_etc, f"no {CONFIG_FILE} and no {WEIGHTS_FILE}"),
        (_pickle_beside, "pickle"),
        (_pickle_only, "pickle"),
        (_weights_link_out, "leaves the folder"),
        (_readme_link_out, "leaves the folder"),
        (_relative_link_out, "leaves the folder"),
        (_dangling_link, "not a regular file"),
        (_weights_a_folder, "not a regular file"),
    ],
)
def test_a_refused_folder_sends_nothing(server, tmp_path, capsys, fault, says):
    folder = adapter_folder(tmp_path / "ad")
    outside = tmp_path / "secret.txt"
    outside.write_text("SECRET")
    fault(folder, outside)
    code, out, err = run_cli(capsys, "adapters", "add", "ad", str(folder), "--url", server.url)
    assert code == Exit.BAD_INPUT, err
    assert says in err and "nothing was sent" in err, err
    assert len(err.strip().splitlines()) == 1 and not out
    assert server.received == []


def test_not_a_directory_sends_nothing(server, tmp_path, capsys):
    for path in (tmp_path / "nope", adapter_folder(tmp_path / "ad") / CONFIG_FILE):
        code, _, err = run_cli(capsys, "adapters", "add", "ad", str(path), "--url", server.url)
        assert code == Exit.BAD_INPUT and "not a directory" in err
    assert server.received == []


def test_a_file_that_grows_while_sent_cannot_break_the_request(
    server, tmp_path, capsys, monkeypatch
):
    """Each file is read once, before the request is built: one that grows between the
    request's Content-Length and its body (a log, /etc/mtab) changes nothing of the request."""
    folder = adapter_folder(tmp_path / "ad")
    (folder / "README.md").write_text("first")
    before = {n: (folder / n).read_bytes() for n in (CONFIG_FILE, WEIGHTS_FILE, "README.md")}
    send = httpx.Client.send

    def grow_then_send(self, request, **kw):
        for name in before:
            with (folder / name).open("ab") as f:
                f.write(b"more" * 10_000)
        return send(self, request, **kw)

    monkeypatch.setattr(httpx.Client, "send", grow_then_send)
    code, _, err = run_cli(capsys, "adapters", "add", "ad", str(folder), "--url", server.url)
    assert code == Exit.OK, err
    (request,) = server.received
    assert request.form()[1] == before


# -- server answers: one line and an exit code ----------------------------------------------


@pytest.mark.parametrize(
    ("answer", "code", "says"),
    [
        ((200, b'{"adapters": []}', "application/json"), Exit.OK, ""),
        ((401, b'{"error": "Unauthorized"}', "application/json"), Exit.UNAUTHORIZED, "--api-key"),
        ((404, b'{"error": {"message": "nope\\nsecond"}}', "application/json"), Exit.MISSING, ""),
        ((409, b'{"detail": "busy"}', "application/json"), Exit.REFUSED, "busy"),
        ((500, b"Internal\nServer Error", "text/plain"), Exit.SERVER_ERROR, "Internal Server"),
        ((200, b"<html>", "text/html"), Exit.SERVER_ERROR, "not JSON"),
        ((302, b"", "text/plain"), Exit.REFUSED, "error (302)"),
    ],
)
def test_every_answer_is_one_line_and_a_code(server, capsys, answer, code, says):
    server.answer = answer
    got, _, err = run_cli(capsys, "adapters", "list", "--url", server.url)
    assert got == code and says in err
    assert len(err.strip().splitlines()) == (0 if code == Exit.OK else 1), err


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(
            st.sampled_from(["id", "state", "adapters", "name", "error", "source_url", "x"]),
            children,
            max_size=4,
        )
    ),
    max_leaves=8,
).filter(lambda v: "rolling_back" not in json.dumps(v))  # rollback polls while it lasts

COMMANDS = [
    ("adapters", "list"),
    ("adapters", "remove", "x"),
    ("migrate", "status", "job"),
    ("migrate", "rollback", "job"),
    ("migrate", "start", "--from", "http://old", "--no-follow"),
]


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    command=st.sampled_from(COMMANDS),
    status=st.sampled_from([200, 201, 202, 204, 400, 401, 403, 404, 409, 422, 500, 502]),
    body=JSON.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=40),
)
def test_no_server_answer_ends_in_a_traceback(server, capsys, command, status, body):
    server.answer = (status, b"" if status == 204 else body, "application/json")
    code = main([*command, "--url", server.url])
    _, err = capsys.readouterr()
    assert code in set(Exit) and "Traceback" not in err
    assert len(err.strip().splitlines()) <= 1, err


def test_anything_unexpected_is_one_line_and_exit_6(server, capsys, monkeypatch):
    import vllm_lora_ext.cli.adapters as adapters

    def broken(_body: object) -> int:
        raise RuntimeError("a bug\nover two lines")

    monkeypatch.setattr(adapters, "_print", broken)
    code, _, err = run_cli(capsys, "adapters", "list", "--url", server.url)
    assert code == Exit.SERVER_ERROR == 6
    assert err.strip() == "error: unexpected failure: RuntimeError: a bug over two lines"


# -- options before and after the action -------------------------------------------------------


def test_options_after_the_action_reach_the_server(server, capsys):
    code, _, err = run_cli(capsys, "adapters", "list", "--url", server.url, "--api-key", "k-1")
    assert code == Exit.OK, err
    code, _, err = run_cli(
        capsys, "adapters", "--api-key", "k-2", "remove", "x", "--url", server.url
    )
    assert code == Exit.OK, err
    got = [(r.method, r.path, r.headers.get("authorization")) for r in server.received]
    assert got == [
        ("GET", "/v1/adapters", "Bearer k-1"),
        ("DELETE", "/v1/adapters/x", "Bearer k-2"),
    ]


ACTIONS = {
    # command, action, the action's own arguments as units that stay together
    "adapters list": ("adapters", "list", []),
    "adapters add": ("adapters", "add", [("name",), ("some/dir",)]),
    "adapters remove": ("adapters", "remove", [("name",)]),
    "migrate start": ("migrate", "start", [("--from", "http://old:8000"), ("--no-follow",)]),
    "migrate status": ("migrate", "status", [("job-1",), ("--follow",)]),
    "migrate rollback": ("migrate", "rollback", [("job-1",)]),
}
TOKEN = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.:/-]{0,20}", fullmatch=True)
HOST = st.from_regex(r"[a-z0-9][a-z0-9.-]{0,20}", fullmatch=True)
OPTIONS = st.fixed_dictionaries(
    {},
    optional={
        "--url": st.builds("http://{}:{}".format, HOST, st.integers(1, 65535)),
        "--api-key": TOKEN,
        "--timeout": st.floats(0.001, 1e6).map(repr),
    },
)


def _parsed(argv: list[str]) -> dict:
    namespace = vars(build_parser().parse_args(argv))
    namespace.pop("func")
    return namespace


@settings(max_examples=300, deadline=None)
@given(which=st.sampled_from(sorted(ACTIONS)), options=OPTIONS, data=st.data())
def test_options_parse_the_same_before_and_after_the_action(which, options, data):
    """Any split of the shared options between before the action and after it (in any order,
    between the action's own arguments too) parses to the namespace of all of them before."""
    command, action, own = ACTIONS[which]
    units = [(flag, value) for flag, value in options.items()]
    before = [t for unit in units for t in unit]
    expected = _parsed([command, *before, action, *[t for u in own for t in u]])

    after_flags = data.draw(st.sets(st.sampled_from(sorted(options)))) if options else set()
    first = [u for u in units if u[0] not in after_flags]
    tail = [*own]
    for unit in (u for u in units if u[0] in after_flags):
        tail.insert(data.draw(st.integers(0, len(tail))), unit)
    first = data.draw(st.permutations(first))
    argv = [command, *[t for u in first for t in u], action, *[t for u in tail for t in u]]
    assert _parsed(argv) == expected, argv
    for key in ("url", "api_key", "timeout"):
        assert key in expected


@settings(max_examples=100, deadline=None)
@given(which=st.sampled_from(sorted(ACTIONS)), first=TOKEN, second=TOKEN)
def test_an_option_given_before_and_after_takes_the_later(which, first, second):
    command, action, own = ACTIONS[which]
    argv = [command, "--api-key", first, action, *[t for u in own for t in u], "--api-key", second]
    assert _parsed(argv)["api_key"] == second
    assert (
        _parsed([command, "--api-key", first, action, *[t for u in own for t in u]])["api_key"]
        == first
    )
