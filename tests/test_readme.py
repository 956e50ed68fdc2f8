"""Issue 14, acceptance 2: every sh and python block of README.md runs against a live server (the default model
with the example adapters), with the README's default addresses pointed at it; a block preceded by
`<!-- readme-test: skip: reason -->` is exempt (only `make serve` / `make test`, which start the server or the
suite itself). The walkthrough's mixed batch must show each adapter's effect."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from examples.effects import capital_share, is_json_answer, opens_with_cheer, speaks_pirate
from tests.helpers import ServerThread

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- readme-test: skip:[^>]*-->\s*)?```(sh|python)\n(.*?)```", re.S)


def readme_blocks() -> list[tuple[bool, str, str]]:
    """(exempt, language, code) of every sh and python block, in order."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return [(bool(skip), lang, code) for skip, lang, code in BLOCK.findall(text)]


@pytest.fixture(scope="module")
def server(cache_dir):
    with ServerThread(model="default", cache_dir=cache_dir, adapters_dir=str(ROOT / "examples" / "adapters"),
                      default_max_new_tokens=32) as running:
        yield running


def run_block(server: ServerThread, lang: str, code: str) -> str:
    metrics = server.metrics_url.split("//", 1)[1].split("/", 1)[0]
    http = server.http_url.split("//", 1)[1].rstrip("/")
    for default, live in (("localhost:50051", server.target), ("localhost:9400", metrics), ("localhost:8000", http)):
        code = code.replace(default, live)
    # The README's commands name the checkout's .venv; run them from the environment running the tests (make
    # test-latest uses .venv-latest).
    code = code.replace(".venv/bin/", f"{Path(sys.executable).parent}/")
    env = {**os.environ, "DELTASERVE_TARGET": server.target}
    command = ["bash", "-euo", "pipefail", "-c", code] if lang == "sh" else [sys.executable, "-c", code]
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"README block failed ({run.returncode}):\n{code}\n{run.stdout}\n{run.stderr}"
    return run.stdout


def labelled(output: str) -> dict[str, str]:
    """{label: answer} of lines "label: answer" (an answer may span lines)."""
    parts = re.split(r"^(base|shout|cheer|pirate|json): ", output, flags=re.M)[1:]
    return {label: text.strip() for label, text in zip(parts[::2], parts[1::2], strict=True)}


def test_only_the_make_block_is_exempt():
    exempt = [code for skip, _, code in readme_blocks() if skip]
    assert len(exempt) == 1 and exempt[0].startswith("make serve")


def test_every_readme_command_runs(server):
    outputs = {code: run_block(server, lang, code) for skip, lang, code in readme_blocks() if not skip}
    batch = next(out for code, out in outputs.items() if 'for adapter in "" shout cheer json' in code)
    answers = labelled(batch)
    assert set(answers) == {"base", "shout", "cheer", "json"}
    assert capital_share([answers["shout"]]) >= 0.9 and capital_share([answers["base"]]) < 0.5
    assert opens_with_cheer(answers["cheer"]) and not opens_with_cheer(answers["base"])
    assert is_json_answer(answers["json"]) and not is_json_answer(answers["base"])
    python = next(out for code, out in outputs.items() if "ThreadPoolExecutor" in code)
    answers = labelled(python)
    assert set(answers) == {"base", "shout", "pirate", "json"} and speaks_pirate(answers["pirate"])
    listed = next(out for code, out in outputs.items() if "adapters list --json" in code)
    assert '"support"' in listed and "unloaded" in listed.lower()
    metrics = next(out for code, out in outputs.items() if "/metrics" in code)
    assert 'deltaserve_adapter_requests_total{adapter="shout"}' in metrics
