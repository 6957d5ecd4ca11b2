"""Incremental detokenization: multi-byte characters across tokens, stop strings, streaming hold-back."""

import pytest

from inlaid.engine.detokenizer import IncrementalDetokenizer, fast_decoder

from ..conftest import make_tokenizer


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()  # byte-level: "é" is two tokens, "日" three


def stream(tok, text, stop=()):
    detok = IncrementalDetokenizer(tok, tok("prompt: ")["input_ids"], stop)
    out, stopped = [], False
    for token in tok(text, add_special_tokens=False)["input_ids"]:
        stopped = detok.push(token)
        out.append(detok.delta(finished=stopped))
        if stopped:
            break
    out.append(detok.delta(finished=True))
    return detok.text, out, stopped


def test_multibyte_characters_never_stream_half(tok):
    text, deltas, stopped = stream(tok, "café 日本 ok")
    assert text == "café 日本 ok" and "".join(deltas) == text and not stopped
    assert all("\ufffd" not in d for d in deltas)


def test_stop_string_across_tokens_is_cut_and_never_streamed(tok):
    text, deltas, stopped = stream(tok, "answer: 42\n###\nmore", stop=("###", "\n\n"))
    assert stopped and text == "answer: 42\n" and "".join(deltas) == text
    assert not any("#" in d for d in deltas)


def test_earliest_of_several_stop_strings_wins(tok):
    text, _, stopped = stream(tok, "a b STOP c END", stop=("END", "STOP"))
    assert stopped and text == "a b "


@pytest.mark.parametrize("skip", [True, False])
def test_fast_decoder_equals_the_tokenizers_decode(tok, skip):
    """The Rust decode that skips transformers' wrapper gives the wrapper's text on every window,
    special tokens included; with clean-up spaces on, the wrapper itself is used."""
    ids = tok("café 日本, ok. Hello ! x", add_special_tokens=True)["input_ids"] + [tok.eos_token_id]
    decode = fast_decoder(tok, skip)
    assert all(decode(ids[i:j]) == tok.decode(ids[i:j], skip_special_tokens=skip)
               for i in range(len(ids)) for j in range(i, len(ids) + 1))

    class Unused:
        def decode(self, *args, **kwargs):
            raise AssertionError("the Rust decode skips the clean-up")

    class CleanUp:
        clean_up_tokenization_spaces = True
        backend_tokenizer = Unused()

        def decode(self, tokens, skip_special_tokens):
            return f"wrapper {tokens} {skip_special_tokens}"

    assert fast_decoder(CleanUp(), skip)([1, 2]) == f"wrapper [1, 2] {skip}"


@pytest.mark.parametrize("cut", range(1, 14))
def test_text_read_only_at_the_end_equals_the_streamed_text(tok, cut):
    """Without stop strings the tokens are decoded when the text is read: once at the end (offline
    generation) or every step (streaming) give the same text as decoding each token eagerly (a stop
    string that never matches forces that), also when the output ends inside a character."""
    ids = tok("ok café 日本 ünï", add_special_tokens=False)["input_ids"][:cut]
    prompt = tok("prompt: ")["input_ids"]
    lazy, streamed = IncrementalDetokenizer(tok, prompt), IncrementalDetokenizer(tok, prompt)
    eager = IncrementalDetokenizer(tok, prompt, stop=("\x00never",))
    deltas = []
    for token in ids:
        lazy.push(token)
        streamed.push(token)
        eager.push(token)
        deltas.append(streamed.delta(finished=False))
    assert lazy.text == eager.text == "".join(deltas) + streamed.delta(finished=True)
    assert "\ufffd" not in lazy.text and tok.decode(ids).startswith(lazy.text)
