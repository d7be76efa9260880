"""Synthetic chat data for the demo model: arithmetic, tool use, and plain requests.

Every conversation is a list of OpenAI-style messages (+ an optional `tools` list) with the
reasoning in `reasoning_content`, so the Thinking chat template puts it inside <think>. The
families: (a) integer +/- of up to three-digit numbers with carry-by-carry reasoning; (b) a
get_weather / get_time tool call, the tool's response, and the final answer; (c) a plain request
while tools are offered (no call). All draws come from one `random.Random(seed)`: same seed, same data.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "The city name"}},
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "Get the current local time in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "The city name"}},
                "required": ["city"],
            },
        },
    },
]

CITIES = [
    "Paris", "London", "Berlin", "Madrid", "Rome", "Vienna", "Prague", "Warsaw", "Lisbon", "Dublin",
    "Oslo", "Stockholm", "Helsinki", "Copenhagen", "Amsterdam", "Brussels", "Zurich", "Athens",
    "Istanbul", "Cairo", "Nairobi", "Lagos", "Tokyo", "Seoul", "Beijing", "Shanghai", "Mumbai",
    "Delhi", "Bangkok", "Singapore", "Jakarta", "Manila", "Sydney", "Melbourne", "Auckland",
    "Toronto", "Chicago", "Boston", "Denver", "Seattle", "Miami", "Houston", "Mexico City",
    "Lima", "Bogota", "Santiago", "Buenos Aires", "Sao Paulo", "New York", "Los Angeles",
]  # fmt: skip
CONDITIONS = ["sunny", "cloudy", "rainy", "windy", "snowy", "foggy", "stormy", "clear"]
CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Spain": "Madrid", "Italy": "Rome", "Japan": "Tokyo",
    "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima", "Greece": "Athens", "Norway": "Oslo",
    "Sweden": "Stockholm", "Finland": "Helsinki", "Portugal": "Lisbon", "Ireland": "Dublin",
    "Austria": "Vienna", "Poland": "Warsaw", "Thailand": "Bangkok", "Chile": "Santiago",
    "Canada": "Ottawa", "Australia": "Canberra",
}  # fmt: skip
NAMES = ["Anna", "Ben", "Carla", "David", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas",
         "Kiara", "Liam", "Maya", "Noah", "Olga", "Pablo", "Quinn", "Rosa", "Sam", "Tariq"]  # fmt: skip
SYSTEM_PROMPTS = ["You are a helpful assistant.", "You are a concise assistant.", "Answer briefly."]

ADD_Q = ["What is {a} + {b}?", "What is {a} plus {b}?", "Compute {a} + {b}.", "How much is {a} plus {b}?",
         "Calculate {a} + {b}.", "What do you get when you add {a} and {b}?", "Please add {a} and {b}."]  # fmt: skip
SUB_Q = ["What is {a} - {b}?", "What is {a} minus {b}?", "Compute {a} - {b}.", "How much is {a} minus {b}?",
         "Calculate {a} - {b}.", "What do you get when you subtract {b} from {a}?", "What is {a} take away {b}?"]  # fmt: skip
WEATHER_Q = ["What's the weather in {c}?", "How is the weather in {c} right now?", "Is it raining in {c}?",
             "Tell me the weather for {c}.", "What is the weather like in {c} today?", "Weather in {c}?"]  # fmt: skip
TIME_Q = ["What time is it in {c}?", "What's the local time in {c}?", "Could you tell me the current time in {c}?",
          "Time in {c}?", "What is the time in {c} right now?", "Tell me the time in {c}."]  # fmt: skip
COLUMNS = ["Ones", "Tens", "Hundreds", "Thousands"]


@dataclass
class Conversation:
    """One training / eval conversation; `meta` carries what eval needs to grade an answer."""

    family: str  # "arith" | "tool" | "plain"
    messages: list[dict]
    tools: list[dict] | None = None
    meta: dict = field(default_factory=dict)


# ---- (a) arithmetic ----------------------------------------------------------------------------
def _digits(n: int, width: int) -> list[int]:
    """Least-significant first, zero-padded to width."""
    return [(n // 10**i) % 10 for i in range(width)]


def add_reasoning(a: int, b: int) -> str:
    width = max(len(str(a)), len(str(b)))
    da, db = _digits(a, width), _digits(b, width)
    lines, carry, so_far = [f"Add {a} and {b} column by column."], 0, ""
    for i in range(width):
        s = da[i] + db[i] + carry
        so_far = str(s % 10) + so_far
        lines.append(f"{COLUMNS[i]}: {da[i]} + {db[i]} + {carry} = {s}, digit {s % 10}, carry {s // 10}. So far: {so_far}")
        carry = s // 10
    if carry:
        so_far = "1" + so_far
        lines.append(f"{COLUMNS[width]}: carry 1, digit 1. So far: {so_far}")
    lines.append(f"So {a} + {b} = {a + b}.")
    return "\n".join(lines)


def sub_reasoning(a: int, b: int) -> str:
    lines = []
    hi, lo = (a, b) if a >= b else (b, a)
    if a < b:
        lines.append(f"{b} is larger than {a}, so compute {b} - {a} and make it negative.")
    else:
        lines.append(f"Subtract {b} from {a} column by column.")
    width = len(str(hi))
    dh, dl = _digits(hi, width), _digits(lo, width)
    borrow, so_far = 0, ""
    for i in range(width):
        d = dh[i] - dl[i] - borrow
        if d < 0:
            lines.append(f"{COLUMNS[i]}: {dh[i]} - {dl[i]} - {borrow} < 0, so 1{dh[i]} - {dl[i]} - {borrow} = {d + 10}, "
                         f"digit {d + 10}, borrow 1. So far: {d + 10}{so_far}")  # fmt: skip
            so_far, borrow = str(d + 10) + so_far, 1
        else:
            lines.append(f"{COLUMNS[i]}: {dh[i]} - {dl[i]} - {borrow} = {d}, digit {d}, borrow 0. So far: {d}{so_far}")
            so_far, borrow = str(d) + so_far, 0
    lines.append(f"So {a} - {b} = {a - b}.")
    return "\n".join(lines)


def _operand(rng: random.Random) -> int:
    width = rng.choice([1, 2, 3, 3, 3])  # mostly three-digit numbers, the hard case
    return rng.randint(0 if width == 1 else 10 ** (width - 1), 10**width - 1)


def arith_question(rng: random.Random) -> tuple[str, int, int, str]:
    a, b, op = _operand(rng), _operand(rng), rng.choice("+-")
    q = rng.choice(ADD_Q if op == "+" else SUB_Q).format(a=a, b=b)
    return q, a, b, op


def arith_turn(a: int, b: int, op: str, tools_offered: bool) -> dict:
    reasoning = add_reasoning(a, b) if op == "+" else sub_reasoning(a, b)
    if tools_offered:
        reasoning = "This is arithmetic, so no tool is needed.\n" + reasoning
    result = a + b if op == "+" else a - b
    return {"role": "assistant", "content": f"{a} {op} {b} = {result}.", "reasoning_content": reasoning}


def make_arith(rng: random.Random, tools_offered: bool = False) -> Conversation:
    q, a, b, op = arith_question(rng)
    msgs = [{"role": "user", "content": q}, arith_turn(a, b, op, tools_offered)]
    return Conversation(
        "plain" if tools_offered else "arith", msgs, TOOLS if tools_offered else None,
        {"kind": "arith", "answer": a + b if op == "+" else a - b},
    )  # fmt: skip


# ---- (b) tool use ------------------------------------------------------------------------------
def tool_result(name: str, city: str, rng: random.Random) -> dict:
    if name == "get_weather":
        return {"city": city, "temperature_c": rng.randint(-10, 38), "condition": rng.choice(CONDITIONS)}
    return {"city": city, "time": f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}"}


def tool_call_turn(name: str, city: str) -> dict:
    what = "the current weather" if name == "get_weather" else "the current local time"
    return {
        "role": "assistant",
        "content": "",
        "reasoning_content": f"The user wants {what} in {city}. I will call {name} with city {city}.",
        "tool_calls": [{"type": "function", "function": {"name": name, "arguments": {"city": city}}}],
    }


def final_answer_turn(name: str, result: dict) -> dict:
    city = result["city"]
    if name == "get_weather":
        t, cond = result["temperature_c"], result["condition"]
        reasoning = f"The tool says it is {cond} and {t} degrees Celsius in {city}."
        answer = f"It is currently {cond} in {city} with a temperature of {t} degrees Celsius."
    else:
        reasoning = f"The tool says the local time in {city} is {result['time']}."
        answer = f"The current local time in {city} is {result['time']}."
    return {"role": "assistant", "content": answer, "reasoning_content": reasoning}


def make_tool(rng: random.Random) -> Conversation:
    name, city = rng.choice(["get_weather", "get_time"]), rng.choice(CITIES)
    q = rng.choice(WEATHER_Q if name == "get_weather" else TIME_Q).format(c=city)
    result = tool_result(name, city, rng)
    msgs = [
        {"role": "user", "content": q},
        tool_call_turn(name, city),
        {"role": "tool", "content": json.dumps(result)},
        final_answer_turn(name, result),
    ]
    return Conversation("tool", msgs, TOOLS, {"kind": "tool", "name": name, "city": city, "result": result})


# ---- (c) plain requests (tools offered but not needed) -----------------------------------------
def plain_turn(rng: random.Random) -> tuple[str, dict, str]:
    """(question, assistant message, expected substring of the answer)."""
    kind = rng.choice(["capital", "greet", "hello"])
    if kind == "capital":
        country = rng.choice(sorted(CAPITALS))
        q = rng.choice(["What is the capital of {x}?", "Which city is the capital of {x}?"]).format(x=country)
        cap = CAPITALS[country]
        r = f"The user asks for the capital of {country}. I know it is {cap}, so no tool is needed."
        return q, {"role": "assistant", "content": f"The capital of {country} is {cap}.", "reasoning_content": r}, cap
    if kind == "greet":
        name = rng.choice(NAMES)
        q = rng.choice(["Say hello to {n}.", "Please greet {n}.", "Greet my friend {n}."]).format(n=name)
        r = f"The user wants me to greet {name}. No tool is needed."
        return q, {"role": "assistant", "content": f"Hello, {name}! Nice to meet you.", "reasoning_content": r}, name
    q = rng.choice(["Hi!", "Hello!", "Hey there.", "Good morning!"])
    r = "The user is greeting me. No tool is needed."
    return q, {"role": "assistant", "content": "Hello! How can I help you today?", "reasoning_content": r}, "Hello"


def make_plain(rng: random.Random) -> Conversation:
    if rng.random() < 0.4:  # arithmetic while tools are offered
        return make_arith(rng, tools_offered=True)
    q, turn, expect = plain_turn(rng)
    return Conversation("plain", [{"role": "user", "content": q}, turn], TOOLS, {"kind": "plain", "expect": expect})


# ---- mixing ------------------------------------------------------------------------------------
FAMILY_WEIGHTS = {"arith": 0.5, "tool": 0.3, "plain": 0.2}


def with_extras(conv: Conversation, rng: random.Random) -> Conversation:
    """Sometimes a system prompt, sometimes an earlier exchange (whose reasoning the template drops)."""
    msgs = conv.messages
    if rng.random() < 0.1:
        q, a, b, op = arith_question(rng)
        msgs = [{"role": "user", "content": q}, arith_turn(a, b, op, conv.tools is not None)] + msgs
    if rng.random() < 0.2:
        msgs = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] + msgs
    return Conversation(conv.family, msgs, conv.tools, conv.meta)


def make_conversation(rng: random.Random, weights: dict[str, float] | None = None) -> Conversation:
    weights = weights or FAMILY_WEIGHTS
    family = rng.choices(list(weights), weights=list(weights.values()))[0]
    conv = {"arith": make_arith, "tool": make_tool, "plain": make_plain}[family](rng)
    return with_extras(conv, rng)


def parse_mix(spec: str) -> dict[str, float]:
    """"arith=0.5,tool=0.3,plain=0.2" -> family weights (unnamed families get 0)."""
    weights = {}
    for part in spec.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in FAMILY_WEIGHTS:
            raise ValueError(f"mix: unknown family {name!r}; have {sorted(FAMILY_WEIGHTS)}")
        try:
            weights[name] = float(value)
        except ValueError:
            raise ValueError(f"mix: weight of {name!r} is not a number: {value!r}") from None
        if not 0 <= weights[name] < float("inf"):  # (also refuses NaN)
            raise ValueError(f"mix: weight of {name!r} must be a finite number >= 0, got {value!r}")
    if sum(weights.values()) <= 0:
        raise ValueError(f"mix: weights must sum to more than 0, got {spec!r}")
    return weights


def generate(n: int, seed: int, weights: dict[str, float] | None = None) -> list[Conversation]:
    """n conversations, deterministic in (seed, weights)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    return [make_conversation(rng, weights) for _ in range(n)]
