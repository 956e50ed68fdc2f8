"""Issue 12, acceptance 1-3: the official `openai` client (sync and async) against a real server on loopback.

Greedy completions equal gRPC Generate for the base model, a PEFT LoRA and a PEFT prefix; streamed chat adds up to
the whole answer; n=3 with a seed is reproducible; 24 concurrent chats over three models each equal their single
answer; errors come in OpenAI's shape."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from deltaserve.v1 import generation_pb2 as pb
from tests.helpers import ServerThread, chat_request
from tests.openai_fixtures import MODEL_ID, write_adapters

pytestmark = pytest.mark.integration

PROMPTS = ["The capital of France is", "def fibonacci(n):"]
MODELS = [MODEL_ID, "lora", "prefix"]
TOKENS = 10


@pytest.fixture(scope="module")
def served(tmp_path_factory, default_model_dir, cache_dir):
    root = write_adapters(tmp_path_factory.mktemp("openai-adapters"), default_model_dir)
    with ServerThread(model="default", cache_dir=cache_dir, adapters_dir=str(root), adapters_poll_interval=0,
                      kv_cache_tokens=8192) as server:
        yield server


@pytest.fixture(scope="module")
def client(served):
    with openai.OpenAI(base_url=f"{served.http_url}/v1", api_key="none", max_retries=0) as c:
        yield c


def _adapter(model: str) -> str:
    return "" if model == MODEL_ID else model.removeprefix(f"{MODEL_ID}:")


def _grpc_text(served, prompt: str, model: str) -> str:
    reply = served.stub.Generate(pb.GenerateRequest(text=prompt, adapter_id=_adapter(model),
                                                    stopping=pb.StoppingCriteria(max_new_tokens=TOKENS)))
    return reply.text


def _chat_grpc_text(served, prompt: str, model: str, tokens: int) -> str:
    request = chat_request(prompt, adapter_id=_adapter(model), stopping=pb.StoppingCriteria(max_new_tokens=tokens))
    return served.stub.Generate(request).text


def test_models_list_base_and_adapters(client):
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {MODEL_ID, "lora", "prefix"}
    assert models["lora"].model_extra["parent"] == MODEL_ID
    assert models["prefix"].model_extra["parent"] == MODEL_ID
    assert models[MODEL_ID].model_extra["parent"] is None
    assert client.models.retrieve("lora").id == "lora"


@pytest.mark.parametrize("model", [*MODELS, f"{MODEL_ID}:lora"])
def test_greedy_completions_equal_grpc(served, client, model):
    for prompt in PROMPTS:
        answer = client.completions.create(model=model, prompt=prompt, max_tokens=TOKENS, temperature=0)
        assert answer.choices[0].text == _grpc_text(served, prompt, model)
        assert answer.model == model
        assert answer.usage.completion_tokens <= TOKENS


def test_adapters_change_the_answer(client):
    texts = {model: [client.completions.create(model=model, prompt=p, max_tokens=TOKENS, temperature=0)
                     .choices[0].text for p in PROMPTS] for model in MODELS}
    assert texts["lora"] != texts[MODEL_ID]
    assert texts["prefix"] != texts[MODEL_ID]


def test_prompt_list_gives_one_choice_each(served, client):
    answer = client.completions.create(model="lora", prompt=PROMPTS, max_tokens=TOKENS, temperature=0)
    assert [c.index for c in answer.choices] == list(range(len(PROMPTS)))
    assert [c.text for c in answer.choices] == [_grpc_text(served, p, "lora") for p in PROMPTS]


@pytest.mark.parametrize("model", MODELS)
def test_streamed_chat_adds_up_to_the_whole_answer(served, client, model):
    prompt = "Write a short poem about the sea."
    whole = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                           max_tokens=16, temperature=0)
    text = whole.choices[0].message.content
    assert text == _chat_grpc_text(served, prompt, model, 16)
    chunks = list(client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 2
    assert "".join(pieces) == text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_n3_with_seed_is_reproducible(client):
    def three() -> list[str]:
        answer = client.chat.completions.create(model="lora", messages=[{"role": "user", "content": "Tell a joke."}],
                                                max_tokens=12, temperature=1.0, n=3, seed=7)
        assert [c.index for c in answer.choices] == [0, 1, 2]
        return [c.message.content for c in answer.choices]

    first = three()
    assert three() == first
    assert len(set(first)) > 1      # each choice is its own sequence with its own draw


def test_top_logprobs(client):
    answer = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens
    assert "".join(entry.token for entry in content).startswith(answer.choices[0].message.content[:3])
    for entry in content:
        alternatives = [alt.logprob for alt in entry.top_logprobs]
        assert len(alternatives) == 3 and alternatives == sorted(alternatives, reverse=True)
        assert entry.logprob == pytest.approx(alternatives[0])     # greedy: the chosen token is the likeliest
        assert entry.top_logprobs[0].token == entry.token
    legacy = client.completions.create(model="prefix", prompt="Hello", max_tokens=4, temperature=0, logprobs=2)
    logprobs = legacy.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 4
    assert all(len(top) <= 2 for top in logprobs.top_logprobs)


def test_24_concurrent_chats_over_three_models(served):
    prompts = ["Name a color.", "Count to three.", "Say hello in French."]
    jobs = [(MODELS[i % 3], prompts[(i // 3) % 3]) for i in range(24)]

    async def run() -> tuple[list[str], dict[tuple[str, str], str]]:
        async with openai.AsyncOpenAI(base_url=f"{served.http_url}/v1", api_key="none", max_retries=0) as client:
            async def ask(model: str, prompt: str) -> str:
                answer = await client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": prompt}], max_tokens=8, temperature=0)
                return answer.choices[0].message.content

            alone = {job: await ask(*job) for job in sorted(set(jobs))}
            together = await asyncio.gather(*(ask(*job) for job in jobs))
            return together, alone

    together, alone = asyncio.run(run())
    assert together == [alone[job] for job in jobs]


def _error(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_errors_in_openai_shape(served, client):
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="no-such-adapter", prompt="Hi", max_tokens=2)
    assert missing.value.status_code == 404 and missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as cold:
        client.completions.create(model=MODEL_ID, prompt="Hi", max_tokens=2, temperature=-1)
    assert cold.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as long:
        client.completions.create(model=MODEL_ID, prompt="word " * 6000, max_tokens=2)
    assert long.value.body["code"] == "context_length_exceeded"
    http = httpx.Client(base_url=served.http_url, timeout=30)
    chat = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    for extra, param in [({"tools": [{"type": "function"}]}, "tools"), ({"presence_penalty": 0.5}, "presence_penalty"),
                         ({"logit_bias": {"1": 3}}, "logit_bias"), ({"x" * 500: 1}, "x" * 64 + "…"),
                         ({"response_format": {"type": "json_object"}}, "response_format"),
                         ({"top_logprobs": 2}, "top_logprobs"),
                         ({"logprobs": True, "top_logprobs": 21}, "top_logprobs")]:
        error = _error(http.post("/v1/chat/completions", json={**chat, **extra}))
        assert error["param"] == param and param[:20] in error["message"], error
        assert len(error["message"]) < 200
    for extra, param in [({"echo": True}, "echo"), ({"best_of": 3}, "best_of"), ({"suffix": "x"}, "suffix")]:
        response = http.post("/v1/completions", json={"model": MODEL_ID, "prompt": "Hi", **extra})
        assert response.status_code == 400 and _error(response)["param"] == param
    neutral = {"presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}, "user": "u1", "best_of": 1,
               "stop": "\n", "top_k": -1, "repetition_penalty": 1.0, "ignore_eos": True, "seed": 3}
    assert http.post("/v1/completions", json={"model": MODEL_ID, "prompt": "Hi", **neutral}).status_code == 200
    assert http.get("/health").json() == {"status": "SERVING"}
