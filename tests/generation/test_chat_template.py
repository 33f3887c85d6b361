"""ChatTemplate renders exactly what transformers' apply_chat_template renders, or fails clearly."""

from __future__ import annotations

import json

import pytest

from qwen_deploy.checkpoint.random_model import qwen_tokenizer_dir
from qwen_deploy.errors import ArtifactError
from qwen_deploy.generation.chat_template import ChatTemplate, ChatTemplateError
from qwen_deploy.generation.tokenizer import load_special_tokens

transformers = pytest.importorskip("transformers", reason="apply_chat_template is the reference")
jinja2 = pytest.importorskip("jinja2")

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "查询城市天气 (weather <b>now</b> & later)",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "城市名"}},
            "required": ["city"],
        },
    },
}
SYSTEM = {"role": "system", "content": "You are a careful financial analyst."}

CASES = {
    "system_user": ([SYSTEM, {"role": "user", "content": "What is a convertible bond?"}], {}),
    "user_only_unicode": ([{"role": "user", "content": '可转债是什么？😀 "quoted" <tag>'}], {}),
    "multi_turn": (
        [
            SYSTEM,
            {"role": "user", "content": "Define duration."},
            {"role": "assistant", "content": "Duration measures rate sensitivity."},
            {"role": "user", "content": "And convexity?"},
            {"role": "assistant", "content": "The curvature of price vs. yield."},
            {"role": "user", "content": "Thanks. One more: DV01?"},
        ],
        {},
    ),
    "tool_definitions": (
        [SYSTEM, {"role": "user", "content": "北京天气？"}],
        {"tools": [WEATHER_TOOL]},
    ),
    "tool_calls_and_responses": (
        [
            {"role": "user", "content": "Weather in Beijing and Shanghai?"},
            {
                "role": "assistant",
                "content": "Let me check.",
                "tool_calls": [
                    {
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": {"city": "北京"}},
                    },
                    {
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "上海"}'},
                    },
                ],
            },
            {"role": "tool", "content": '{"temp_c": 3}'},
            {"role": "tool", "content": '{"temp_c": 9}'},
            {"role": "assistant", "content": "Beijing 3°C, Shanghai 9°C."},
            {"role": "user", "content": "Which is warmer?"},
        ],
        {"tools": [WEATHER_TOOL]},
    ),
    "think_in_history_and_last_turn": (
        [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "<think>\nSimple sum.\n</think>\n\n4"},
            {"role": "user", "content": "times 3?"},
            {"role": "assistant", "content": "<think>\n4*3=12\n</think>\n\n12"},
        ],
        {},
    ),
    "think_with_tool_call_after_last_query": (
        [
            {"role": "user", "content": "Weather?"},
            {
                "role": "assistant",
                "content": "<think>\nNeed the tool.\n</think>\n\n",
                "tool_calls": [
                    {
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": {"city": "北京"}},
                    }
                ],
            },
            {"role": "tool", "content": "sunny"},
        ],
        {"tools": [WEATHER_TOOL]},
    ),
    "reasoning_content_field": (
        [
            {"role": "user", "content": "Is 7 prime?"},
            {
                "role": "assistant",
                "content": "Yes.",
                "reasoning_content": "7 has no divisors but 1 and 7.",
            },
        ],
        {},
    ),
    "reasoning_field_alias": (  # `reasoning` (and `thinking`) reach templates as reasoning_content
        [
            {"role": "user", "content": "Is 9 prime?"},
            {"role": "assistant", "content": "No.", "reasoning": "9 = 3 * 3."},
        ],
        {},
    ),
    "enable_thinking_false": (
        [{"role": "user", "content": "Quick answer: 1+1?"}],
        {"enable_thinking": False},
    ),
}


@pytest.fixture(scope="module")
def templates(r1_tokenizer_dir):
    """name -> (transformers tokenizer, our ChatTemplate) for the Qwen and DeepSeek-R1 files."""
    out = {}
    for name, folder in (("qwen", qwen_tokenizer_dir()), ("r1", r1_tokenizer_dir)):
        hf = transformers.AutoTokenizer.from_pretrained(folder)
        source = json.loads((folder / "tokenizer_config.json").read_text())["chat_template"]
        out[name] = (hf, ChatTemplate(source, load_special_tokens(folder)))
    return out


@pytest.mark.parametrize("template", ["qwen", "r1"])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_render_equals_apply_chat_template(templates, template, case, add_generation_prompt):
    hf, ours = templates[template]
    messages, kwargs = CASES[case]
    expected = hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
    )
    assert ours.render(messages, add_generation_prompt=add_generation_prompt, **kwargs) == expected


def test_template_shapes_are_what_the_checkpoints_produce(templates):
    """Guard the fixtures themselves: role tokens, bos and the opened <think> of R1."""
    messages = CASES["system_user"][0]
    r1 = templates["r1"][1].render(messages)
    assert r1.startswith("<｜begin▁of▁sentence｜>You are a careful")
    assert r1.endswith("<｜User｜>What is a convertible bond?<｜Assistant｜><think>\n")
    qwen = templates["qwen"][1].render(messages)
    assert qwen.endswith(
        "<|im_start|>user\nWhat is a convertible bond?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_messages_are_not_modified(templates):
    messages = json.loads(json.dumps(CASES["reasoning_content_field"][0]))
    before = json.dumps(messages)
    templates["qwen"][1].render(messages)
    assert json.dumps(messages) == before


FEATURES = (
    "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
    "{% if m.role == 'system' %}{% continue %}{% endif %}"
    "{{ m | tojson(indent=2, sort_keys=True) }}|{{ m.content | tojson }}\n{% endfor %}"
    "{{ dict(a=1, b='<&>') | tojson }}{% set ns = namespace(n=0) %}"
    "{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}"
    "{% generation %}[{{ messages[-1].content }}]{% endgeneration %}\n"
    "  {% if bos_token is defined %}bos={{ bos_token }}{% endif %} eos={{ eos_token }} "
    "year={{ strftime_now('%Y') }} tools={{ tools | tojson }} x={{ custom_var }}\n"
)


@pytest.mark.parametrize("template", ["qwen", "r1"])
def test_template_features_match_transformers(templates, template):
    """tojson without HTML escaping, loop controls, dict/namespace, generation tag, whitespace
    control, special tokens and extra kwargs as variables, strftime_now."""
    hf, base = templates[template]
    ours = ChatTemplate(FEATURES, base.special_tokens)
    messages = [
        SYSTEM,
        {"role": "user", "content": "中文 <b>&</b>"},
        {"role": "user", "content": "x"},
    ]
    kwargs = {"tools": [WEATHER_TOOL], "custom_var": [1, "二"]}
    expected = hf.apply_chat_template(messages, tokenize=False, chat_template=FEATURES, **kwargs)
    assert ours.render(messages, add_generation_prompt=False, **kwargs) == expected
    assert "中文 <b>&</b>" in expected  # tojson kept the text as is


def test_kwargs_override_special_tokens_like_transformers(templates):
    hf, base = templates["r1"]
    ours = ChatTemplate(FEATURES, base.special_tokens)
    messages = [{"role": "user", "content": "hi"}]
    expected = hf.apply_chat_template(
        messages, tokenize=False, chat_template=FEATURES, eos_token="<EOS>", custom_var=1
    )
    assert ours.render(messages, eos_token="<EOS>", custom_var=1) == expected
    assert "eos=<EOS>" in expected


def test_syntax_error_names_the_line():
    with pytest.raises(ChatTemplateError, match=r"syntax error at line 2: .*export it again"):
        ChatTemplate("{{ bos_token }}\n{% if messages %}never closed", {})


def test_raise_exception_message_reaches_the_user(templates):
    template = (
        "{% for m in messages %}{% if m.role == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}{{ m.content }}{% endfor %}"
    )
    hf, base = templates["qwen"]
    with pytest.raises(jinja2.TemplateError, match="System role not supported"):
        hf.apply_chat_template([SYSTEM], tokenize=False, chat_template=template)
    with pytest.raises(
        ChatTemplateError, match="rejected these messages: System role not supported"
    ):
        ChatTemplate(template, base.special_tokens).render([SYSTEM])


def test_undefined_variable_misuse_is_a_clear_error(templates):
    template = (
        "{% for m in messages %}\n{{ m.content }}\n{{ m.content + missing.attr }}{% endfor %}"
    )
    with pytest.raises(
        ChatTemplateError, match=r"failed at line 3 \(UndefinedError: 'missing' is undefined\)"
    ):
        ChatTemplate(template, {}).render([{"role": "user", "content": "hi"}])


def test_template_rejecting_message_shape_fails_like_transformers(templates):
    """OpenAI-style content=None tool calls: None is dropped (as transformers does), the real
    templates then read a missing content; both fail, ours with a ChatTemplateError."""
    messages = [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
            ],
        },
    ]
    for hf, ours in templates.values():
        with pytest.raises(jinja2.exceptions.UndefinedError):
            hf.apply_chat_template(messages, tokenize=False)
        with pytest.raises(ChatTemplateError, match=r"UndefinedError: .* the messages do not have"):
            ours.render(messages)


def test_sandbox_blocks_mutation_and_internals():
    with pytest.raises(ChatTemplateError, match="SecurityError: access to attribute 'append'"):
        ChatTemplate("{% set x = messages.append(1) %}", {}).render(
            [{"role": "user", "content": "a"}]
        )
    with pytest.raises(ChatTemplateError, match=r"SecurityError.*underscore"):
        ChatTemplate("{% set ns = namespace(_x=1) %}", {}).render(
            [{"role": "user", "content": "a"}]
        )


def test_bad_messages_are_clear_errors():
    template = ChatTemplate("{{ messages | length }}", {})
    with pytest.raises(ChatTemplateError, match="non-empty list"):
        template.render([])
    with pytest.raises(ChatTemplateError, match=r"messages\[1\] is a str"):
        template.render([{"role": "user", "content": "a"}, "b"])
    with pytest.raises(ChatTemplateError, match="tools must be a list of JSON-schema dicts"):
        template.render([{"role": "user", "content": "a"}], tools=["get_weather"])


def _artifact_copy(tiny_artifact, out, chat_template):
    """The tiny artifact (its files linked) with another chat template in its manifest."""
    out.mkdir()
    for file in tiny_artifact.iterdir():
        if file.name != "manifest.json":
            (out / file.name).symlink_to(file)
    manifest = json.loads((tiny_artifact / "manifest.json").read_text())
    manifest["chat_template"] = chat_template
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_from_artifact_renders_like_transformers_on_the_source(
    tiny_artifact, tiny_checkpoint, templates
):
    # the tiny checkpoint carries the package's tokenizer files: reuse the loaded tokenizer
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tiny_checkpoint / name).read_bytes() == (qwen_tokenizer_dir() / name).read_bytes()
    hf = templates["qwen"][0]
    messages, kwargs = CASES["tool_calls_and_responses"]
    ours = ChatTemplate.from_artifact(tiny_artifact)
    assert ours.special_tokens == hf.special_tokens_map
    expected = hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **kwargs
    )
    assert ours.render(messages, **kwargs) == expected


def test_from_artifact_with_broken_or_missing_template(tiny_artifact, tmp_path):
    broken = _artifact_copy(
        tiny_artifact, tmp_path / "broken", "{% for m in messages %}{{ m.content }}"
    )
    with pytest.raises(
        ChatTemplateError,
        match=r"in .*/broken/manifest.json has a Jinja syntax error at line 1: .*endfor",
    ):
        ChatTemplate.from_artifact(broken)
    none = _artifact_copy(tiny_artifact, tmp_path / "none", None)
    with pytest.raises(ArtifactError, match=r"has no chat template .* plain prompt"):
        ChatTemplate.from_artifact(none)
