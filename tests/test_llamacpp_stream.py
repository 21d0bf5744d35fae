"""llama.cpp's streamed chunks turned into our choice deltas: stop strings across chunks, stop token ids, counts.

Chunks here are shaped as llama.cpp's /completion stream sends them (one token each; `logprobs.content` carrying the
chosen token's id when logprobs were asked for). The same path runs against the real engine in test_server.py."""

from __future__ import annotations

from serve.engine import GenerationParams
from serve.llamacpp_engine import _ChoiceState


def chunk(text: str, token_id: int | None = None, finish: str | None = None) -> dict:
    c: dict = {"index": 0, "text": text, "finish_reason": finish}
    if token_id is not None:
        c["logprobs"] = {"content": [{"id": token_id, "token": text, "logprob": -0.1}]}
    return c


def feed_all(state: _ChoiceState, chunks: list[dict]) -> tuple[str, str | None, object]:
    text, finish, stop = "", None, None
    for c in chunks:
        d = state.feed(c, None)
        if d is not None:
            text += d.text
            finish, stop = d.finish_reason or finish, d.stop_reason if d.finish_reason else stop
    return text, finish, stop


def retokenize(text: str) -> list[int]:
    return [ord(ch) for ch in text]


def test_a_stop_string_split_over_chunks_is_held_then_cut() -> None:
    state = _ChoiceState(0, GenerationParams(max_tokens=10, stop=("END",)), retokenize)
    assert feed_all(state, [chunk("ab"), chunk("cE"), chunk("N"), chunk("Dx")]) == ("abc", "stop", "END")


def test_held_text_that_is_not_a_stop_comes_out() -> None:
    state = _ChoiceState(0, GenerationParams(max_tokens=10, stop=("END",)), retokenize)
    assert feed_all(state, [chunk("aE"), chunk("N"), chunk("x", finish="length")]) == ("aENx", "length", None)


def test_a_stop_token_outputs_held_text_and_hides_itself() -> None:
    state = _ChoiceState(0, GenerationParams(max_tokens=10, stop=("\n\n",), stop_token_ids=(2,)), retokenize)
    # "Hello\n" is held (it may start "\n\n"); the stop token ends the choice and the held "\n" is shown
    assert feed_all(state, [chunk("Hello", 10), chunk("\n", 11), chunk("</s>", 2)]) == ("Hello\n", "stop", 2)


def test_the_longest_partial_stop_is_held() -> None:
    state = _ChoiceState(0, GenerationParams(max_tokens=10, stop=("abcabd", "zz")), retokenize)
    d = state.feed(chunk("xabcab"), None)
    assert d is not None and d.text == "x" and state.held == "abcab"
