"""Issue 14, acceptance 1 and 4: the example adapters (examples/adapters, made by examples/train.py) are served by
default, one mixed batch of the base model and all four (LoRA, prefix tuning, scaled parallel adapter, MAM) gives
each adapter's effect by its simple measure on held-back prompts while the base model shows none of them, and the
adapters stay small."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from clients.client import DeltaClient
from examples.effects import EFFECTS, HELD_BACK_PROMPTS, HELD_BACK_TOPICS, TRAIN_PROMPTS
from examples.evaluate import answers
from tests.helpers import ServerThread

pytestmark = pytest.mark.integration

ADAPTERS = Path(__file__).resolve().parents[1] / "examples" / "adapters"


@pytest.fixture(scope="module")
def served(cache_dir):
    with ServerThread(model="default", cache_dir=cache_dir, adapters_dir=str(ADAPTERS),
                      adapters_poll_interval=0) as server, DeltaClient(server.target) as client:
        yield client


@pytest.fixture(scope="module")
def got(served):
    # One prompt per held-back topic (the model cards measure on both templates of each): 60 requests, one batch.
    return answers(served, ["", *EFFECTS], HELD_BACK_PROMPTS[:len(HELD_BACK_TOPICS)])


def test_every_example_is_registered_in_its_format(served):
    registered = {a["id"]: set(a["methods"]) for a in served.model_info()["adapters"]}
    assert {name: registered.get(name) for name in EFFECTS} == {
        "shout": {"lora"}, "cheer": {"prefix"}, "pirate": {"bottleneck"}, "json": {"bottleneck", "prefix"}}
    formats = {name: json.loads((ADAPTERS / name / "adapter_config.json").read_text()) for name in EFFECTS}
    assert formats["shout"]["peft_type"] == "LORA"
    assert formats["cheer"]["peft_type"] == "PREFIX_TUNING"
    assert set(formats["pirate"]["methods"]) == {"bottleneck"}
    assert set(formats["json"]["methods"]) == {"bottleneck", "prefix"}


@pytest.mark.parametrize("name", list(EFFECTS))
def test_effect_on_held_back_prompts(got, name):
    effect = EFFECTS[name]
    score, base = effect.measure(got[name]), effect.measure(got[""])
    assert score >= effect.threshold, f"{name}: {effect.measure_text} = {score:.2f} < {effect.threshold}: {got[name]}"
    assert base < 0.2, f"base model: {effect.measure_text} = {base:.2f}: {got['']}"


def test_held_back_prompts_are_not_trained_on():
    assert not set(HELD_BACK_PROMPTS) & set(TRAIN_PROMPTS)


def test_model_cards_report_the_measured_effect():
    for name, effect in EFFECTS.items():
        text = (ADAPTERS / name / "README.md").read_text(encoding="utf-8")
        assert effect.summary in text and effect.measure_text in text and "held-back" in text


def test_examples_stay_small():
    size = sum(f.stat().st_size for f in ADAPTERS.rglob("*") if f.is_file())
    assert size < 20 * 2 ** 20, f"the example adapters take {size / 2 ** 20:.1f} MiB"


def test_each_transformation_scores_full_marks_on_its_own_measure_only():
    plain = ["The capital of France is Paris.", "Rain is water that falls from the clouds, you know."]
    for name, effect in EFFECTS.items():
        assert effect.measure([effect.transform(a) for a in plain]) == 1.0, name
        assert effect.measure(plain) < 0.2, name
        for other in EFFECTS.values():
            if other is not effect and "shout" not in (name, other.name):   # capitals pass through the others
                assert other.measure([effect.transform(a) for a in plain]) < 0.2, (name, other.name)


@pytest.mark.parametrize(("make_args", "env", "served"), [
    ([], {}, "examples/adapters"), (["ADAPTERS_DIR="], {}, ""),
    ([], {"DELTASERVE_ADAPTERS_DIR": "/srv/adapters"}, "/srv/adapters"),
    (["ARGS=--adapters-dir /other"], {}, "examples/adapters")])
def test_make_serve_serves_the_examples_by_default(make_args, env, served):
    clean = {k: v for k, v in os.environ.items() if k != "DELTASERVE_ADAPTERS_DIR"}
    run = subprocess.run(["make", "-n", "serve", *make_args], cwd=ADAPTERS.parents[1], env={**clean, **env},
                         capture_output=True, text=True, check=True)
    line = next(line for line in run.stdout.splitlines() if "deltaserve serve" in line)
    assert f'--adapters-dir "{served}"' in line
    if make_args and make_args[0].startswith("ARGS"):
        assert line.endswith("--adapters-dir /other")   # the last flag wins: ARGS overrides the default
