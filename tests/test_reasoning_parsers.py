"""Reasoning parsers on outputs in each family's real format; streamed pieces join to the
non-streamed split however the text is cut; the token-level tracker gates a constraint.

Formats: DeepSeek-R1's chat template ends the prompt with "<think>\\n" (the model card asks to
force it), so the output is "reasoning</think>\\n\\nanswer"; early R1 builds wrote "<think>"
themselves. Qwen3 (model card): "<think>\\n...\\n</think>\\n\\nanswer" in thinking mode; with
enable_thinking=False the template appends "<think>\\n\\n</think>\\n\\n" to the prompt and the
output has no think block; Qwen3-2507-Thinking's template ends the prompt with "<think>\\n".
"""

import numpy as np
import pytest

from pagedjax.reasoning import REASONING_PARSERS, Phase, ReasoningTracker, get_reasoning_parser
from pagedjax.tokenizer import Tokenizer, load_tokenizer
from tests.tiny_tokenizer import make_test_tokenizer
from pagedjax.tool_parsers import assemble, get_tool_parser

SEED = 777
R1_OUT = ("Okay, the user asks for 2 + 2. That's basic arithmetic: 2 + 2 = 4. Wait, could it be a trick "
          "<b>question</b>? No.\n</think>\n\nThe answer is **4**.")
QWEN3_OUT = "<think>\nThe user wants the capital of France. It's Paris.\n</think>\n\nThe capital of France is Paris."

# (parser, prompt_in_reasoning, output, expected reasoning_content, expected content)
CASES = [
    ("deepseek_r1", None, R1_OUT,
     "Okay, the user asks for 2 + 2. That's basic arithmetic: 2 + 2 = 4. Wait, could it be a trick "
     "<b>question</b>? No.\n", "\n\nThe answer is **4**."),
    ("deepseek_r1", None, "<think>\nHmm.\n</think>\n\n4", "\nHmm.\n", "\n\n4"),  # early R1: writes <think>
    ("deepseek_r1", None, "Still thinking when max_tokens hit <thi", "Still thinking when max_tokens hit <thi", None),
    ("deepseek_r1", None, "</think>Answer only.", "", "Answer only."),
    ("deepseek_r1", False, "A plain answer, the prompt closed the think block.", None,
     "A plain answer, the prompt closed the think block."),
    ("qwen3", None, QWEN3_OUT, "\nThe user wants the capital of France. It's Paris.\n",
     "\n\nThe capital of France is Paris."),
    ("qwen3", None, "The capital of France is Paris.", None, "The capital of France is Paris."),  # no thinking
    ("qwen3", None, "Use </think> to end a think block.", None, "Use </think> to end a think block."),
    ("qwen3", True, "Paris is the capital.\n</think>\n\nParis.", "Paris is the capital.\n", "\n\nParis."),  # 2507
    ("qwen3", None, "<think>\n\n</think>\n\nHi!", "\n\n", "\n\nHi!"),
    ("qwen3", None, "<think>cut off", "cut off", None),
]


def _stream(parser, pieces):
    deltas = [d for piece in pieces for d in parser.feed(piece)] + parser.finish()
    assert all(not d.tool_calls for d in deltas)
    msg = assemble(deltas)
    return msg.reasoning_content, msg.content


@pytest.mark.parametrize("name, prompt_in_reasoning, text, reasoning, content", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_extract_and_stream(name, prompt_in_reasoning, text, reasoning, content):
    cls = get_reasoning_parser(name)
    assert cls(prompt_in_reasoning=prompt_in_reasoning).extract_reasoning(text) == (reasoning, content)
    whole = (reasoning or None, content or "")

    def streamed(pieces):
        r, c = _stream(cls(prompt_in_reasoning=prompt_in_reasoning), pieces)
        return r or None, c

    for cut in range(len(text) + 1):
        assert streamed([text[:cut], text[cut:]]) == whole, f"cut at {cut}"
    assert streamed(list(text)) == whole
    rng = np.random.default_rng(SEED)
    for trial in range(50):
        cuts = np.sort(rng.choice(len(text) + 1, size=rng.integers(1, 10)))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        assert streamed(pieces) == whole, f"seed={SEED} trial={trial} cuts={cuts.tolist()}"


def test_reasoning_then_tool_calls_stream():
    """The server's order: the reasoning parser first, its content deltas into the tool parser."""
    text = ('<think>\nNeed the weather tool.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": '
            '{"city": "Paris"}}\n</tool_call>')
    for cut in range(0, len(text) + 1, 3):
        rp, tp = get_reasoning_parser("qwen3")(), get_tool_parser("hermes")()
        out = []
        for piece in (text[:cut], text[cut:], None):
            ds = rp.feed(piece) if piece is not None else rp.finish()
            for d in ds:
                if d.reasoning_content is not None:
                    out.append(d)
                if d.content is not None:
                    out += tp.feed(d.content)
        out += tp.finish()
        msg = assemble(out)
        assert msg.reasoning_content == "\nNeed the weather tool.\n"
        assert msg.content == "\n\n"
        assert [(c.name, c.arguments) for c in msg.tool_calls] == [("get_weather", '{"city": "Paris"}')]


@pytest.fixture(scope="module")
def think_tok(tmp_path_factory):
    path = make_test_tokenizer(tmp_path_factory.mktemp("tok"), vocab_size=300)
    tok = load_tokenizer(path)
    tok.backend.add_tokens(["<think>", "</think>"])
    return Tokenizer(tok.backend, bos_token=tok.bos_token, eos_token=tok.eos_token, pad_token=tok.pad_token,
                     chat_template=tok.chat_template)


def test_token_level_end_and_prompt_state(think_tok):
    parser = get_reasoning_parser("qwen3")(think_tok)
    start, end = parser.start_token_id, parser.end_token_id
    assert think_tok.convert_ids_to_tokens([start, end]) == ["<think>", "</think>"]
    ids = think_tok.encode("hello <think>\nhmm\n</think>\n\nok", add_special_tokens=False)
    assert start in ids and end in ids
    assert parser.is_reasoning_end(ids)
    assert not parser.is_reasoning_end(ids[: ids.index(end)])
    assert not parser.is_reasoning_end(ids + [start])  # a think block opened again
    # Qwen3 with enable_thinking=False: the prompt closes an empty think block -> content only.
    no_think = think_tok.encode("<|im_start|>assistant\n<think>\n\n</think>\n\n", add_special_tokens=False)
    p = get_reasoning_parser("qwen3").for_prompt(think_tok, no_think)
    assert p.extract_reasoning("Paris.\n</think>") == (None, "Paris.\n</think>")
    thinking = think_tok.encode("<|im_start|>assistant\n<think>\n", add_special_tokens=False)
    p = get_reasoning_parser("qwen3").for_prompt(think_tok, thinking)
    assert p.extract_reasoning("Hmm.\n</think>\n\nParis.") == ("Hmm.\n", "\n\nParis.")


def test_tracker_gates_the_constraint(think_tok):
    start, end = think_tok.convert_tokens_to_ids(["<think>", "</think>"])
    word = think_tok.encode("Paris", add_special_tokens=False)
    r1 = get_reasoning_parser("deepseek_r1")(think_tok)
    qwen = get_reasoning_parser("qwen3")(think_tok)
    # R1, prompt ends with <think>: thinking until </think>, which is not the answer's.
    t = ReasoningTracker(r1, [5, start, 7])
    assert t.phase is Phase.THINKING and not t.constrained
    assert [t.update(x) for x in [*word, end, *word]] == [False] * len(word) + [False] + [True] * len(word)
    assert t.reasoning_ended
    # Qwen3 after a closed think block: the answer from the first token.
    assert ReasoningTracker(qwen, [start, 9, end]).reasoning_ended
    # Qwen3 with no tag in the prompt: undecided; the row also allows <think>.
    t = ReasoningTracker(qwen, [5, 6])
    assert t.phase is Phase.UNDECIDED and t.constrained
    row = np.zeros((2, (think_tok.vocab_size + 31) // 32), np.int32)
    t.allow_start_token(row, 1)
    bits = np.unpackbits(row.view(np.uint8), axis=1, bitorder="little")
    assert np.flatnonzero(bits[1]).tolist() == [start] and not bits[0].any()
    f = t.fork()
    assert t.update(start) is False and t.phase is Phase.THINKING
    assert f.update(word[0]) is True and f.reasoning_ended  # the fork answered at once
    # R1 with no tag in the prompt: it thinks first.
    assert ReasoningTracker(r1, [5, 6]).phase is Phase.THINKING


def test_registry_and_missing_tokens():
    assert set(REASONING_PARSERS) == {"deepseek_r1", "qwen3"}
    with pytest.raises(ValueError, match="unknown reasoning parser 'r2'; known: deepseek_r1, qwen3"):
        get_reasoning_parser("r2")
    p = get_reasoning_parser("deepseek_r1")(load_tokenizer())  # SmolLM2 has no <think>
    with pytest.raises(ValueError, match="needs a <think> token"):
        p.start_token_id
    with pytest.raises(ValueError, match="needs the tokenizer"):
        get_reasoning_parser("qwen3")().end_token_id
