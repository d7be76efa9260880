"""The grammar (llguidance Lark) of a forced Qwen3-Coder call: tool_choice "required" or named.

After the prefill `<tool_call>\\n<function=` ("required": the grammar offers the tools' names) or
`<tool_call>\\n<function=NAME>\\n` (named), the model writes the function's parameters in its schema's
order, the required ones always, each as `<parameter=KEY>\\nVALUE\\n</parameter>\\n`, then
`</function>\\n</tool_call>`. A value whose type is not a string follows its schema as JSON; a string
is any text holding none of the format's tags (a string enum / const: one of its values).
"""

from __future__ import annotations

import json

from qwen3next.engine.structured_output import (
    available,
    grammar_of,
    no_extra_properties,
)
from qwen3next.parsers.qwen3_coder_tool_calls import deref, schema_types
from qwen3next.sampling_params import StructuredOutputsParams

_TAIL = json.dumps("\n</parameter>\n")
# a string value: any text without a tag that would end the value or the call (lazy up to the tail)
_TEXT_RULES = [f"text[suffix={_TAIL}]: TEXT",
               r"TEXT: /(?s:.*)/ & ~/(?s:.*(<parameter=|<\/parameter>|<\/function>|<\/tool_call>).*)/"]
# JSON values in the form the template writes (tojson: ", " and ": ", no other whitespace)
_COMPACT = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}


def _value(schema, parameters: dict) -> str:
    """The rule body of one parameter's value, its closing tag included. Local `$ref`s point into
    the `parameters`' $defs / definitions: the value's schema takes them along."""
    if not isinstance(schema, dict):
        return "text"
    schema = deref(schema, parameters)
    defs = {k: parameters[k] for k in ("$defs", "definitions") if isinstance(parameters.get(k), dict)}
    types = schema_types(schema)
    choices = schema["enum"] if isinstance(schema.get("enum"), list) else (
        [schema["const"]] if "const" in schema else None)
    if choices and all(isinstance(c, str) for c in choices) and types in ([], ["string"]):
        return "(" + " | ".join(json.dumps(c) for c in choices) + ") " + _TAIL
    if types and "string" not in types:
        return "%json " + json.dumps({**no_extra_properties({**defs, **schema}), "x-guidance": _COMPACT}) + " " + _TAIL
    return "text"


def _params(i: int, parameters) -> tuple[str, list[str]]:
    """(the body of tool i's parameter list, its rules)."""
    props = parameters.get("properties") if isinstance(parameters, dict) else None
    if not isinstance(props, dict):
        return "", []
    required = parameters.get("required") if isinstance(parameters.get("required"), list) else []
    body, rules = [], []
    for j, (key, schema) in enumerate(props.items()):
        rules.append(f"p{i}_{j}: " + json.dumps(f"<parameter={key}>\n") + " " + _value(schema, parameters))
        body.append(f"p{i}_{j}" + ("" if key in required else "?"))
    return " ".join(body), rules


def coder_call_grammar(tools, name: str | None, end_id: int | None) -> str:
    """The Lark grammar of the rest of the call: any tool's (`name` None) or `name`'s.
    `end_id`: the `</tool_call>` token, which a tokenizer may mark special (text would not match it)."""
    end = json.dumps("</tool_call>") + (f" | <[{end_id}]>" if end_id is not None else "")
    rules, alts = ["end: " + end, *_TEXT_RULES], []
    for i, t in enumerate(tools):
        t = t.model_dump() if callable(getattr(t, "model_dump", None)) else t
        fn = t.get("function", t)
        fn_name, parameters = fn.get("name"), fn.get("parameters")
        if name is not None and fn_name != name:
            continue
        params, param_rules = _params(i, parameters)
        head = "" if name is not None else json.dumps(f"{fn_name}>\n") + " "
        alts.append(f"call{i}")
        rules += [f"call{i}: {head}{params} " + json.dumps("</function>\n") + " end", *param_rules]
    if not alts:
        raise ValueError(f"tool_choice: no tool named {name!r} in tools")
    return "\n".join(["start: " + " | ".join(alts), *rules])


def coder_forced_call(tools, name: str | None, end_id: int | None) -> StructuredOutputsParams | None:
    """The forced call's grammar as structured outputs (None without llguidance: the prefill alone
    guides the call); ValueError naming `tools` when a schema is no usable grammar."""
    if not available():
        return None
    so = StructuredOutputsParams(grammar=coder_call_grammar(tools, name, end_id))
    try:
        grammar_of(so)
    except ValueError as e:
        raise ValueError(f"tools: a function's parameters are no usable JSON schema ({e})") from None
    return so
