"""deltactl against the fake Generation server."""

from __future__ import annotations

import io
import json
import socket
import sys

import pytest

from clients.cli import main
from tests.fake_generation import (
    ABORT_DETAILS,
    ABORT_PROMPT,
    LOGPROB,
    FakeServer,
)

# --- deltactl -------------------------------------------------------------------------------------------

def test_cli_generate_sends_a_user_message_and_prints_the_text(fake: FakeServer, capsys) -> None:
    assert main(["generate", "--target", fake.target, "hello there"]) == 0
    assert capsys.readouterr().out == "echo: hello there\n"
    request = fake.servicer.requests[-1]
    assert [(m.role, m.content) for m in request.chat.messages] == [("user", "hello there")]


def test_cli_generate_system_and_raw(fake: FakeServer, capsys) -> None:
    assert main(["generate", "--target", fake.target, "--system", "be terse", "q"]) == 0
    assert [m.role for m in fake.servicer.requests[-1].chat.messages] == ["system", "user"]
    assert fake.servicer.requests[-1].chat.messages[0].content == "be terse"
    assert main(["generate", "--target", fake.target, "--raw", "plain text"]) == 0
    assert fake.servicer.requests[-1].WhichOneof("prompt") == "text"
    assert fake.servicer.requests[-1].text == "plain text"
    with pytest.raises(SystemExit) as exited:
        main(["generate", "--target", fake.target, "--raw", "--system", "s", "q"])
    assert exited.value.code == 2


def test_cli_generate_options_and_json(fake: FakeServer, capsys) -> None:
    argv = ["generate", "--target", fake.target, "--adapter", "pirate", "--json", "--max-new-tokens", "9",
            "--temperature", "0.5", "--top-p", "0.75", "--top-k", "3", "--repetition-penalty", "1.5",
            "--seed", "11", "--stop", "A", "--stop", "B", "--ignore-eos", "--logprobs", "yo ho"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 1
    response = json.loads(out)
    assert response["text"] == "echo: yo ho" and response["finish_reason"] == "stop_sequence"
    assert response["seed"] == 11 and response["adapter_id"] == "pirate" and response["stop_sequence"] == "A"
    assert response["logprobs"] == [LOGPROB] * 3
    request = fake.servicer.requests[-1]
    assert request.stopping.max_new_tokens == 9 and list(request.stopping.stop_sequences) == ["A", "B"]
    assert request.stopping.ignore_eos and request.return_logprobs
    assert (request.sampling.temperature, request.sampling.top_p, request.sampling.top_k,
            request.sampling.repetition_penalty) == (0.5, 0.75, 3, 1.5)


def test_cli_generate_stream(fake: FakeServer, capsys) -> None:
    assert main(["generate", "--target", fake.target, "--stream", "a b c"]) == 0
    assert capsys.readouterr().out == "echo: a b c\n"
    assert main(["generate", "--target", fake.target, "--stream", "--json", "a b c"]) == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 1
    assert json.loads(out)["text"] == "echo: a b c"
    assert json.loads(out)["generated_tokens"] == 4


def test_cli_generate_reads_stdin(fake: FakeServer, capsys, monkeypatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("from stdin"))
    assert main(["generate", "--target", fake.target, "-"]) == 0
    assert capsys.readouterr().out == "echo: from stdin\n"
    assert fake.servicer.requests[-1].chat.messages[0].content == "from stdin"


def test_cli_target_comes_from_the_environment(fake: FakeServer, capsys, monkeypatch) -> None:
    monkeypatch.setenv("DELTASERVE_TARGET", fake.target)
    assert main(["health"]) == 0
    assert capsys.readouterr().out == "SERVING\n"


@pytest.mark.parametrize("stream", [False, True])
def test_cli_reports_rpc_errors(fake: FakeServer, capsys, stream: bool) -> None:
    argv = ["generate", "--target", fake.target, ABORT_PROMPT] + (["--stream"] if stream else [])
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "INVALID_ARGUMENT" in err and ABORT_DETAILS in err


def test_cli_reports_an_unreachable_server(capsys) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]
    assert main(["health", "--target", f"127.0.0.1:{free_port}", "--timeout", "5"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_cli_reports_invalid_values(fake: FakeServer, capsys) -> None:
    assert main(["generate", "--target", fake.target, "--max-new-tokens", "-1", "x"]) == 2
    assert capsys.readouterr().err.startswith("deltactl: ")
    assert fake.servicer.requests == []


def test_cli_health_exit_codes(fake: FakeServer, capsys) -> None:
    assert main(["health", "--target", fake.target, "--service", "down"]) == 1
    assert capsys.readouterr().out == "NOT_SERVING\n"
    assert main(["health", "--target", fake.target, "--service", "nope"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err


def test_cli_info(fake: FakeServer, capsys) -> None:
    assert main(["info", "--target", fake.target]) == 0
    out = capsys.readouterr().out
    assert "fake/tiny" in out and "LlamaForCausalLM" in out and "75/100 blocks free" in out
    assert "pirate" in out and "peft_lora" in out and "25.0% used" in out
    assert main(["info", "--target", fake.target, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["vocab_size"] == 49152 and info["running_requests"] == 1
