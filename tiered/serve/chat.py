"""Chat prompts and tool calls for the OpenAI chat endpoint.

Owns: `render_chat` (OpenAI messages and tools -> prompt text through the model's chat template, or a
ChatML template with Qwen/Hermes-style tools for a model that has none), `parse_tool_calls` (the
`<tool_call>{json}</tool_call>` blocks of a reply -> OpenAI `tool_calls`).
Does not own: tokenisation (tokenizer.py) or HTTP (app.py).
"""
from __future__ import annotations

import json
import re
import uuid
from typing import Any

# ChatML with Hermes-style tools (as Qwen2.5's template renders them): used when a model has no template.
CHATML_TEMPLATE = """{%- if tools %}<|im_start|>system
{% if messages and messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% elif messages and messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for m in messages %}
{%- if m.role == 'system' %}{%- continue %}{%- endif %}
{%- if m.role == 'tool' %}<|im_start|>user
<tool_response>
{{ m.content }}
</tool_response><|im_end|>
{% elif m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant
{% if m.content %}{{ m.content }}
{% endif %}
{%- for tc in m.tool_calls %}<tool_call>
{"name": "{{ tc.function.name }}", "arguments": {{ tc.function.arguments }}}
</tool_call>
{% endfor %}<|im_end|>
{% else %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


def message_text(content: Any) -> str:
    """OpenAI message content (a string, None, or a list of {"type": "text", "text": ...} parts) -> text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")


def render_chat(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> str:
    """The prompt text for `messages` (OpenAI form) with `tools` passed to the template."""
    msgs = []
    for m in messages:
        d = {"role": m["role"], "content": message_text(m.get("content"))}
        if m.get("tool_calls"):
            d["tool_calls"] = m["tool_calls"]
        if m.get("tool_call_id"):
            d["tool_call_id"] = m["tool_call_id"]
        if m.get("name"):
            d["name"] = m["name"]
        msgs.append(d)
    template = None if tokenizer.chat_template else CHATML_TEMPLATE
    return tokenizer.apply_chat_template(msgs, tools=tools, template=template)


def parse_tool_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """Split a reply into content and OpenAI tool_calls; blocks that are not valid JSON stay in the content."""
    calls: list[dict[str, Any]] = []
    kept: list[str] = []
    last = 0
    for m in TOOL_CALL.finditer(text):
        try:
            obj = json.loads(m.group(1))
            name = obj["name"]
            args = obj.get("arguments", {})
        except (ValueError, KeyError, TypeError):
            continue
        kept.append(text[last:m.start()])
        last = m.end()
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": str(name),
                                   "arguments": args if isinstance(args, str) else json.dumps(args)}})
    kept.append(text[last:])
    content = "".join(kept).strip() if calls else text
    return (content or None) if calls else content, calls
