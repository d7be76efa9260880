"""Request fields -> StructuredOutputsParams: OpenAI's `response_format` (json_object, json_schema),
vLLM's `structured_outputs: {json | regex | choice | grammar | json_object}` and its older
`guided_json` / `guided_regex` / `guided_choice` / `guided_grammar` (sent through extra_body).

At most one of them per request. The grammar is compiled here, in the API process, so a bad schema,
regex or grammar is a 400 naming the field before the request reaches the engine (which compiles
it again for its matcher). A Thinking prompt (ends in `<think>\\n`) gets the grammar only after the
model's `</think>`, as vLLM's reasoning parser does: the reasoning stays free, the content is
constrained; other prompts are constrained from the first token. `forced_call` is the grammar of
the rest of a forced tool call (tool_choice "required" / named), after its prefilled start.
"""

from __future__ import annotations

import json

from qwen3next.api.errors import bad_request
from qwen3next.api.protocol import SamplingFields
from qwen3next.engine.structured_output import available, grammar_of, no_extra_properties
from qwen3next.sampling_params import StructuredOutputsParams

_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def structured_outputs(req: SamplingFields, start_after_token_id: int | None = None
                       ) -> StructuredOutputsParams | None:
    """The request's constraint (None without one); 400 for a bad or doubled one."""
    found: list[tuple[str, dict]] = []  # (request field, StructuredOutputsParams fields)
    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        found.append(("response_format", {"json_object": True}))
    elif rf is not None and rf.type == "json_schema":
        js = rf.json_schema
        if js is None:
            raise bad_request("response_format.json_schema is required when type is 'json_schema'",
                              "response_format.json_schema")
        schema = js.get("schema")
        if schema is not None and not isinstance(schema, dict):
            raise bad_request("response_format.json_schema.schema must be a JSON object",
                              "response_format.json_schema.schema")
        # no schema: any JSON object (OpenAI's schema is optional)
        found.append(("response_format.json_schema.schema",
                      {"json": schema} if schema is not None else {"json_object": True}))
    for name, kind in _GUIDED.items():
        value = getattr(req, name)
        if value is not None:
            found.append((name, {kind: value}))
    so = req.structured_outputs
    if so is not None:
        fields = so.model_dump(exclude_none=True, by_alias=True)
        found.append(("structured_outputs", fields))
    if not found:
        return None
    if len(found) > 1:
        names = ", ".join(dict.fromkeys(n.split(".")[0] for n, _ in found))
        raise bad_request(f"only one of response_format, structured_outputs, guided_json, guided_regex, "
                          f"guided_choice, guided_grammar may be set (got {names})", found[1][0].split(".")[0])
    param, fields = found[0]
    try:
        params = StructuredOutputsParams(**fields, start_after_token_id=start_after_token_id)
    except ValueError as e:
        raise bad_request(f"{param}: {e}", param) from None
    if param == "structured_outputs":
        param += "." + params.kind
    try:
        grammar_of(params)
    except ValueError as e:
        raise bad_request(f"{param}: {e}", param) from None
    return params


def forced_call(tools, name: str | None, end_id: int | None) -> StructuredOutputsParams | None:
    """The rest of a hermes call after its prefilled start `<tool_call>\\n{"name": "`: a tool's name
    (`name`'s only, when given), `", "arguments": `, then arguments valid under its
    `parameters` schema, then `}\\n</tool_call>` (vLLM guides forced calls by the schema likewise;
    `end_id`: the `</tool_call>` token, which a tokenizer may mark special: text would not match it).
    None without llguidance (the prefill alone then guides the call)."""
    if not available():
        return None
    end = json.dumps("</tool_call>") + (f" | <[{end_id}]>" if end_id is not None else "")
    rules, alts = [f"end: {end}"], []
    for i, t in enumerate(t for t in tools if name is None or t.function.name == name):
        schema = no_extra_properties(t.function.parameters or {"type": "object"})
        # the template's own form (tojson: ", " and ": ", no other whitespace)
        compact = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}
        schema = {**schema, "x-guidance": compact}
        head = json.dumps(t.function.name + '", "arguments": ')
        alts.append(f"call{i}")
        rules += [f"call{i}: {head} args{i} " + json.dumps("}\n") + " end", f"args{i}: %json {json.dumps(schema)}"]
    so = StructuredOutputsParams(grammar="\n".join(["start: " + " | ".join(alts)] + rules))
    try:
        grammar_of(so)
    except ValueError as e:
        raise bad_request(f"tools: a function's parameters are no usable JSON schema ({e})", "tools") from None
    return so
