"""Tool calls (tools / tool_choice) and GBNF grammars: through the official `openai` client
against a real server, through `LLM` and through `Llama`, on the tiny random-weight model (left
alone it writes noise, so whatever parses here was made to by the grammar)."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest

from torchless import LLM, Llama
from torchless.errors import TorchlessError
from torchless.llama_compat import LlamaGrammar
from torchless.tools import OPEN, ToolCallStream, parse_reply, scan_calls, tool_request

from model_factory import make_hf_model, tokenizer_metadata_of, write_gguf
from test_server import KEY, _serve

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "metric": {"type": "boolean"}},
        "required": ["city", "days", "metric"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {
        "zone": {"type": "string", "pattern": "^[A-Z]{3}$"}}, "required": ["zone"],
        "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
SEEDS = range(4)


def check_calls(calls, names=tuple(SCHEMAS)):
    """Each call OpenAI-shaped, to a known function, its arguments valid for its schema."""
    assert calls
    for call in calls:
        assert call["id"].startswith("call_") and call["type"] == "function"
        assert call["function"]["name"] in names
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[call["function"]["name"]])


@pytest.fixture(scope="module")
def tools_gguf(tmp_path_factory, smollm2_path):
    """conftest's tiny llama (SmolLM2's tokenizer and template), with room for the tools'
    description in its prompt (1024 positions, not 256)."""
    meta = tokenizer_metadata_of(smollm2_path)
    model = make_hf_model("llama", seed=2, vocab_size=len(meta["tokenizer.ggml.tokens"]),
                          max_position_embeddings=1024, tie_word_embeddings=True)
    return write_gguf(model, tmp_path_factory.mktemp("tools") / "tiny.gguf", quant="Q8_0",
                      tokenizer_metadata=meta)


@pytest.fixture(scope="module")
def llm(tools_gguf):
    model = LLM(str(tools_gguf))
    yield model
    model.close()


@pytest.fixture(scope="module")
def server(tools_gguf):
    base, logs, app, srv, thread = _serve(LLM(str(tools_gguf)), max_batch=4, api_key=KEY)
    yield base
    srv.should_exit = True
    thread.join(10)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=120)


# -- LLM -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_required_and_named_calls_parse_and_validate_under_sampling(llm, choice):
    for seed in SEEDS:
        out = llm.create_chat_completion(ASK, tools=TOOLS, tool_choice=choice, parallel_tool_calls=False,
                                         temperature=1.0, seed=seed, max_tokens=60)
        choice_out = out["choices"][0]
        assert choice_out["finish_reason"] == "tool_calls", choice_out
        assert choice_out["message"]["content"] is None and len(choice_out["message"]["tool_calls"]) == 1
        check_calls(choice_out["message"]["tool_calls"], ("get_time",) if isinstance(choice, dict) else SCHEMAS)


def test_parallel_calls_are_several_blocks(llm):
    out = llm.create_chat_completion(ASK, tools=TOOLS, tool_choice="required", temperature=1.0, seed=1,
                                     max_tokens=200)["choices"][0]
    if out["finish_reason"] == "tool_calls":  # the model may stop after any whole call
        check_calls(out["message"]["tool_calls"])


def test_streamed_deltas_reassemble_to_the_whole_reply(llm):
    kw = dict(tools=TOOLS, tool_choice="required", parallel_tool_calls=False, temperature=1.0, max_tokens=60)
    for seed in SEEDS:
        whole = llm.create_chat_completion(ASK, seed=seed, **kw)["choices"][0]
        chunks = list(llm.create_chat_completion(ASK, seed=seed, stream=True, **kw))
        deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"][0]["delta"].get("tool_calls")]
        head = deltas[0]["tool_calls"][0]
        assert head["id"].startswith("call_") and head["type"] == "function" and head["function"]["arguments"] == ""
        assert all(set(d["tool_calls"][0]) == {"index", "function"} for d in deltas[1:])
        arguments = "".join(d["tool_calls"][0]["function"].get("arguments", "") for d in deltas)
        assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
        assert not any(c["choices"][0]["delta"].get("content") for c in chunks)
        want = whole["message"]["tool_calls"][0]["function"]
        assert (head["function"]["name"], arguments) == (want["name"], want["arguments"])


def test_tool_choice_none_and_auto_give_text_or_valid_calls(llm):
    none = llm.create_chat_completion(ASK, tools=TOOLS, tool_choice="none", temperature=1.0, seed=0,
                                      max_tokens=12)["choices"][0]
    assert "tool_calls" not in none["message"] and none["finish_reason"] in ("stop", "length")
    assert isinstance(none["message"]["content"], str)
    for seed in SEEDS:  # the random model almost never writes "<tool_call>" by itself: text
        out = llm.create_chat_completion(ASK, tools=TOOLS, temperature=1.0, seed=seed, max_tokens=12)["choices"][0]
        if out["finish_reason"] == "tool_calls":
            check_calls(out["message"]["tool_calls"])
        else:
            assert isinstance(out["message"]["content"], str)


def test_auto_constrains_once_the_model_writes_the_opening_tag(llm):
    """TriggeredSampler on random logits: a sampler that writes "<tool_call>" itself is then held to
    the calls' grammar (the reply parses); one that writes anything else is left alone."""
    import numpy as np

    from torchless.grammar import TriggeredSampler

    request = tool_request(TOOLS, "auto", parallel_tool_calls=False)
    grammar, trigger = request.grammar(llm.tokenizer, llm.config.vocab_size)
    eos = llm.tokenizer.eos_ids
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        for start in (llm.tokenize(OPEN, add_bos=False), llm.tokenize("Sure", add_bos=False)):
            forced = list(start)
            sampler = TriggeredSampler(lambda logits, h, n: forced.pop(0) if forced else int(np.argmax(logits)),
                                       llm.tokenizer, llm.config.vocab_size, grammar, trigger)
            ids = []
            while len(ids) < 80 and (not ids or ids[-1] not in eos):
                ids.append(sampler(rng.normal(size=llm.config.vocab_size).astype(np.float32) * 3))
            text = llm.detokenize([t for t in ids if t not in eos])
            if start[0] == llm.tokenize(OPEN, add_bos=False)[0]:
                assert sampler.state == "constrained" and ids[-1] in eos
                check_calls(parse_reply(text, request))
            else:
                assert sampler.state == "free" and parse_reply(text, request) is None


def test_tool_turns_render_for_the_follow_up(llm):
    turns = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 1, "metric": true}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    request = tool_request(TOOLS, "auto")
    prompt = llm._render_chat(turns, request)
    assert "<tool_response>\nsunny, 21 C\n</tool_response>" in prompt
    assert '"name": "get_weather"' in prompt and '"city": "Paris"' in prompt and "# Tools" in prompt
    out = llm.create_chat_completion(turns, tools=TOOLS, tool_choice="none", max_tokens=4, temperature=0)
    assert isinstance(out["choices"][0]["message"]["content"], str)


def test_a_template_that_takes_tools_gets_them(llm, monkeypatch):
    template = ("{% for t in tools %}[{{ t.function.name }}]{% endfor %}{% for m in messages %}<{{ m.role }}>"
                "{{ m.content }}{% for c in m.tool_calls or [] %}{{ c.function.arguments.city }}{% endfor %}"
                "{% endfor %}")
    monkeypatch.setattr(llm.tokenizer, "chat_template", template)
    turns = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]}]
    assert llm._render_chat(turns, tool_request(TOOLS)) == (
        "[get_weather][get_time]<user>What is the weather in Paris?<assistant>Oslo")


def test_bad_tools_are_one_line_errors(llm):
    cases = [(dict(tools=[{"type": "function"}]), "tools"),
             (dict(tools=[{"type": "function", "function": {"name": "a b"}}]), "tools"),
             (dict(tools="get_weather"), "tools"),
             (dict(tools=[WEATHER, WEATHER]), "tools"),
             (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}]), "tools"),
             (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
             (dict(tools=TOOLS, tool_choice="sometimes"), "tool_choice"),
             (dict(tool_choice="required"), "tool_choice"),
             (dict(tools=TOOLS, tool_choice="required", grammar='root ::= "x"'), "at most one")]
    for kw, what in cases:
        with pytest.raises(TorchlessError, match=what) as e:
            llm.create_chat_completion(ASK, max_tokens=2, **kw)
        assert "\n" not in str(e.value)


def test_reply_parsing():
    request = tool_request(TOOLS, "auto")
    text = f'{OPEN}\n{{"name":"get_time","arguments":{{"zone":"UTC"}}}}\n</tool_call>'
    calls = parse_reply(text, request)
    assert [c["function"] for c in calls] == [{"name": "get_time", "arguments": '{"zone":"UTC"}'}]
    assert parse_reply(text.replace("get_time", "unknown"), request) is None
    assert parse_reply("plain text", request) is None and parse_reply(text[:-3], request) is None
    assert scan_calls(text + "\n" + text)[1] and len(scan_calls(text + "\n" + text)[0]) == 2
    stream = ToolCallStream(request)
    pieces = [stream.feed(text[i:i + 3]) for i in range(0, len(text), 3)]
    deltas = [d for p in pieces for d in p] + stream.finish("stop")[0]
    assert "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas) == '{"zone":"UTC"}'
    text_stream = ToolCallStream(request)
    assert text_stream.feed("<to") == [] and text_stream.feed("day") == [{"content": "<today"}]


# -- grammars ----------------------------------------------------------------------------------------

def test_gbnf_grammar_constrains_llama_completions(tiny_llama_gguf):
    llama = Llama(model_path=str(tiny_llama_gguf), n_ctx=256, seed=1, verbose=False)
    gbnf = 'root ::= ("yes" | "no") " " [0-9] [0-9]? "!"'
    for grammar in (gbnf, LlamaGrammar.from_string(gbnf)):
        for _ in range(4):
            out = llama("Answer:", grammar=grammar, max_tokens=12, temperature=1.0)["choices"][0]
            assert re.fullmatch(r"(yes|no) [0-9][0-9]?!", out["text"]), out
            assert out["finish_reason"] == "stop"
    schema = LlamaGrammar.from_json_schema(json.dumps({"type": "object", "properties": {
        "n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"], "additionalProperties": False}))
    chat = llama.create_chat_completion(ASK, grammar=schema, max_tokens=20, temperature=1.0)
    assert 0 <= json.loads(chat["choices"][0]["message"]["content"])["n"] <= 9
    for bad in ('root ::= "unterminated', "root ::= foo", "root ::= [a-", 'x ::= "a"'):
        with pytest.raises(TorchlessError) as e:
            llama("Answer:", grammar=bad, max_tokens=2)
        assert str(e.value).startswith("gbnf:") and "\n" not in str(e.value)
    with pytest.raises(TorchlessError, match="grammar must be"):
        llama("Answer:", grammar=42, max_tokens=2)
    llama.close()


def test_llama_chat_tool_calls(tools_gguf):
    llama = Llama(model_path=str(tools_gguf), n_ctx=1024, seed=2, verbose=False)
    out = llama.create_chat_completion(ASK, tools=TOOLS, max_tokens=60,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert out["choices"][0]["finish_reason"] == "tool_calls"
    check_calls(out["choices"][0]["message"]["tool_calls"], ("get_weather",))
    chunks = list(llama.create_chat_completion(ASK, tools=TOOLS, tool_choice="required", stream=True, max_tokens=60))
    assert chunks[-1]["choices"][0]["finish_reason"] in ("tool_calls", "length")
    llama.close()


def test_llm_grammar_in_completion_and_chat(llm, tmp_path):
    out = llm("x", grammar='root ::= "a"+ "b"', max_tokens=8, temperature=1.0, seed=0)["choices"][0]
    assert re.fullmatch(r"a+b?", out["text"])
    (tmp_path / "digits.gbnf").write_text('root ::= [0-9]{3}\n')
    for grammar in ('root ::= [0-9]{3}', LlamaGrammar.from_file(tmp_path / "digits.gbnf")):
        chat = llm.create_chat_completion(ASK, grammar=grammar, max_tokens=6, temperature=1.0, seed=0)
        assert re.fullmatch(r"[0-9]{3}", chat["choices"][0]["message"]["content"])
    with pytest.raises(TorchlessError, match="at most one"):
        llm.create_chat_completion(ASK, grammar='root ::= "a"', response_format={"type": "json_object"})
    with pytest.raises(TorchlessError, match="grammar file"):
        LlamaGrammar.from_file(tmp_path / "missing.gbnf")


# -- the server, through the openai client -------------------------------------------------------------

def test_server_required_and_named_calls(client):
    for seed in SEEDS:
        for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
            r = client.chat.completions.create(model="x", messages=ASK, tools=TOOLS, tool_choice=choice,
                                               parallel_tool_calls=False, temperature=1.0, seed=seed, max_tokens=60)
            message = r.choices[0].message
            assert r.choices[0].finish_reason == "tool_calls" and message.content is None
            check_calls([c.model_dump() for c in message.tool_calls],
                         ("get_weather",) if isinstance(choice, dict) else SCHEMAS)


def test_server_stream_deltas_match_and_the_stream_helper_accepts_them(client):
    kw = dict(model="x", messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
              temperature=1.0, seed=5, max_tokens=60)
    whole = client.chat.completions.create(**kw).choices[0].message.tool_calls[0].function
    with client.chat.completions.stream(**kw) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    call = final.choices[0].message.tool_calls[0]
    assert final.choices[0].finish_reason == "tool_calls" and call.id.startswith("call_")
    assert (call.function.name, call.function.arguments) == (whole.name, whole.arguments)
    chunks = list(client.chat.completions.create(stream=True, **kw))
    first = next(c for c in chunks if c.choices and c.choices[0].delta.tool_calls).choices[0].delta.tool_calls[0]
    assert first.index == 0 and first.type == "function" and first.function.arguments == ""


def test_server_tool_choice_none_and_follow_up_turn(client):
    r = client.chat.completions.create(model="x", messages=ASK, tools=TOOLS, tool_choice="none",
                                       max_tokens=6, temperature=1.0, seed=0)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")
    call = client.chat.completions.create(model="x", messages=ASK, tools=TOOLS, tool_choice="required",
                                          parallel_tool_calls=False, max_tokens=60, seed=1).choices[0].message
    turns = ASK + [call.model_dump(exclude_none=True),
                   {"role": "tool", "tool_call_id": call.tool_calls[0].id, "content": "sunny"}]
    again = client.chat.completions.create(model="x", messages=turns, tools=TOOLS, max_tokens=6, seed=0)
    assert again.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_server_auto_gives_text_or_valid_calls(client):
    for seed in SEEDS:
        r = client.chat.completions.create(model="x", messages=ASK, tools=TOOLS, tool_choice="auto",
                                           temperature=1.0, seed=seed, max_tokens=10)
        if r.choices[0].finish_reason == "tool_calls":
            check_calls([c.model_dump() for c in r.choices[0].message.tool_calls])
        else:
            assert isinstance(r.choices[0].message.content, str) and r.choices[0].message.tool_calls is None


@pytest.mark.parametrize("extra, param", [
    (dict(tools=[{"type": "function", "function": {"name": "bad name"}}]), "tools"),
    (dict(tools=[{"type": "function"}]), "tools"),
    (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
    (dict(tools=TOOLS, tool_choice="always"), "tool_choice"),
    (dict(tool_choice="required"), "tool_choice"),
    (dict(tools=TOOLS, parallel_tool_calls="yes"), "parallel_tool_calls"),
    (dict(tools=TOOLS, tool_choice="required", response_format={"type": "json_object"}), "response_format"),
])
def test_server_bad_tools_are_400s_naming_the_field(client, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="x", messages=ASK, max_tokens=2, **extra)
    assert e.value.body["param"] == param and param in e.value.body["message"]
    assert "\n" not in e.value.body["message"]
