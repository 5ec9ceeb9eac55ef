import json

import pytest

from moelab.data.tokenizer import EOS_TOKEN, load_tokenizer, split_for_encoding, train_bpe
from moelab.errors import DataError

TRICKY = [
    "",
    "hello world",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\n\n\nand\r\nCRLF\r",
    "unicode: café, naïve, Ångström, 日本語, emoji 🤖🎉, combining e\u0301, rtl שלום",
    "zero width\u200bjoiner\u200d and nbsp\u00a0here and line sep\u2028end",
    "literal <|endoftext|> inside a document",
    "\x00\x01 control bytes \x7f",
    "numbers 1234567890 and 3.14159, contractions don't won't I'll",
]


@pytest.fixture(scope="module")
def tok(default_docs):
    texts = [d["text"][:20_000] for d in default_docs[:8]]
    return train_bpe(texts, 400)


def test_roundtrip_exact(tok):
    for text in TRICKY:
        ids = tok.encode(text)
        assert tok.decode(ids) == text, repr(text)
        assert tok.eos_id not in ids  # EOS only ever separates documents
    assert [tok.decode(ids) for ids in tok.encode_batch(TRICKY)] == TRICKY


def test_special_ids_and_size(tok):
    assert tok.eos_id == 0 and tok.eos_token == EOS_TOKEN
    assert 257 <= tok.vocab_size <= 400
    assert max(max(ids) for ids in tok.encode_batch(TRICKY) if ids) < tok.vocab_size


def test_encode_documents_equals_whole_document_encoding(tok, default_docs):
    # long documents are cut into pieces for speed; the token stream must not change
    texts = [d["text"][:60_000] for d in default_docs[::9]] + TRICKY + ["a\n" * 5000]
    assert tok.encode_documents(texts) == tok.encode_batch(texts)


def test_split_for_encoding_rejoins(default_docs):
    text = default_docs[0]["text"][:50_000]
    pieces = split_for_encoding(text, chunk_chars=1000)
    assert "".join(pieces) == text and len(pieces) > 10
    assert split_for_encoding("x" * 5000, chunk_chars=100) == ["x" * 5000]  # no safe cut


def test_save_load_same_ids(tok, tmp_path):
    tok.save(tmp_path / "tokenizer.json")
    for path in (tmp_path / "tokenizer.json", tmp_path):  # file or directory holding it
        again = load_tokenizer(path)
        assert again.vocab_size == tok.vocab_size and again.eos_id == tok.eos_id
        assert again.encode_batch(TRICKY) == tok.encode_batch(TRICKY)


def test_training_is_deterministic(default_docs):
    texts = [d["text"][:10_000] for d in default_docs[:5]]
    a, b = train_bpe(texts, 300), train_bpe(texts, 300)
    assert json.loads(a.hf.to_str()) == json.loads(b.hf.to_str())


def test_errors(tmp_path):
    with pytest.raises(DataError, match="vocab_size"):
        train_bpe(["abc"], 100)
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(tmp_path / "nope.json")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="not a valid tokenizer.json"):
        load_tokenizer(bad)
