"""The real `openai` Python SDK against an engine's OpenAI API.

Run by engine/tests/openai.rs (`openai_python_sdk`) with the venv that
`scripts/setup.sh python` creates:

    python engine/tests/openai_sdk.py --base-url http://127.0.0.1:PORT/v1 --model MODEL

Exits 0 and prints `ok` when every check passes; an AssertionError (or an
SDK exception) names the first one that did not.
"""

import argparse

import openai
from openai import OpenAI


def words(text):
    return [w for w in text.split(" ") if w]


def check_models(client, model):
    ids = [m.id for m in client.models.list().data]
    assert ids == [model], ids
    assert client.models.retrieve(model).id == model


def check_completions(client, model):
    c = client.completions.create(model=model, prompt="The rack holds", max_tokens=8)
    assert c.object == "text_completion", c
    assert c.id.startswith("cmpl-"), c.id
    assert len(c.choices) == 1, c.choices
    choice = c.choices[0]
    assert choice.finish_reason == "length", choice
    assert len(words(choice.text)) == 8, choice.text
    assert c.usage.completion_tokens == 8, c.usage
    assert c.usage.prompt_tokens > 0, c.usage
    assert c.usage.total_tokens == c.usage.prompt_tokens + 8, c.usage

    pieces, finish, usage = [], None, None
    stream = client.completions.create(
        model=model,
        prompt=[1, 2, 3, 4],
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        assert chunk.object == "text_completion", chunk
        if chunk.choices:
            pieces.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    assert len(words("".join(pieces))) == 6, pieces
    assert finish == "length", finish
    assert usage is not None and usage.prompt_tokens == 4 and usage.completion_tokens == 6, usage


def check_chat(client, model):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Say hello to the rack."},
    ]
    r = client.chat.completions.create(model=model, messages=messages, max_completion_tokens=5)
    assert r.object == "chat.completion", r
    assert r.id.startswith("chatcmpl-"), r.id
    message = r.choices[0].message
    assert message.role == "assistant", message
    assert len(words(message.content)) == 5, message.content
    assert r.choices[0].finish_reason == "length", r.choices[0]
    assert r.usage.completion_tokens == 5, r.usage
    assert r.usage.total_tokens == r.usage.prompt_tokens + 5, r.usage

    roles, pieces, finish, usage = [], [], None, None
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=7,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk", chunk
        if chunk.choices:
            delta = chunk.choices[0].delta
            if delta.role:
                roles.append(delta.role)
            if delta.content:
                pieces.append(delta.content)
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    assert roles == ["assistant"], roles
    assert len(words("".join(pieces))) == 7, pieces
    assert finish == "length", finish
    assert usage is not None and usage.completion_tokens == 7, usage
    assert usage.prompt_tokens == r.usage.prompt_tokens, (usage, r.usage)

    # The sim's tokens follow the seed when one is given.
    a = client.chat.completions.create(model=model, messages=messages, max_tokens=6, seed=7)
    b = client.chat.completions.create(model=model, messages=messages, max_tokens=6, seed=7)
    assert a.choices[0].message.content == b.choices[0].message.content, (a, b)


def check_errors(client, model):
    try:
        client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
        raise AssertionError("an unknown model was served")
    except openai.NotFoundError as e:
        assert e.status_code == 404, e
        assert e.code == "model_not_found", e.body
    try:
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "x"}], max_completion_tokens=0
        )
        raise AssertionError("max_completion_tokens=0 was accepted")
    except openai.BadRequestError as e:
        assert e.status_code == 400, e
        assert e.param == "max_completion_tokens", e.body


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--model", required=True)
    args = parser.parse_args()
    client = OpenAI(base_url=args.base_url, api_key="unused", max_retries=0, timeout=60)
    check_models(client, args.model)
    check_completions(client, args.model)
    check_chat(client, args.model)
    check_errors(client, args.model)
    print("ok")


if __name__ == "__main__":
    main()
