"""Tokenizer loading and caption encoding/augmentation."""
import numpy as np
import pytest

from user_dist.caption_aug import CaptionAugment
from user_dist.config import ConfigError, TextEncoderConfig
from user_dist.tokenizer import CaptionEncoder, build_tokenizer


def test_default_is_the_offline_bert_uncased_tokenizer(tokenizer):
    assert len(tokenizer) == 30522 and tokenizer.is_fast
    assert tokenizer.convert_ids_to_tokens(tokenizer("A Red Circle")["input_ids"]) == \
        ["[CLS]", "a", "red", "circle", "[SEP]"]


def test_tokenizer_path_takes_precedence_and_must_exist(tmp_path):
    with pytest.raises(ConfigError, match=f"'model.text.tokenizer_path' points to '{tmp_path / 'nope'}'"):
        build_tokenizer(TextEncoderConfig(tokenizer_path=str(tmp_path / "nope"), pretrained_path="/elsewhere"))
    with pytest.raises(ConfigError, match="'model.text.pretrained_path' points to"):
        build_tokenizer(TextEncoderConfig(pretrained_path=str(tmp_path / "nope")))


def test_a_random_init_encoder_must_have_room_for_the_vocabulary():
    with pytest.raises(ConfigError, match="'model.text.vocab_size' is 1000 but the tokenizer .* has 30522"):
        build_tokenizer(TextEncoderConfig(vocab_size=1000))


def test_encode_adds_cls_sep_pads_and_truncates(tokenizer):
    enc = CaptionEncoder(tokenizer, max_len=6)
    ids, mask = enc.encode(["a red circle", "a very long caption about a blue square"])
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    red, circle = tokenizer.convert_tokens_to_ids(["red", "circle"])
    assert ids.tolist()[0] == [cls, 1037, red, circle, sep, 0] and mask.tolist()[0] == [1, 1, 1, 1, 1, 0]
    assert ids.shape == (2, 6) and ids[1, -1].item() == sep and mask[1].tolist() == [1] * 6


@pytest.mark.parametrize("max_len", [-1, 1, 2])
def test_max_text_len_is_0_for_no_cut_or_at_least_3(tokenizer, max_len):
    with pytest.raises(ConfigError, match="'data.max_text_len' must be 0 \\(no cut\\) or at least 3"):
        CaptionEncoder(tokenizer, max_len)


def test_no_caption_outgrows_the_encoders_positions():
    """build_tokenizer records the encoder's positions (model.text.max_position
    here); a longer max_text_len, or padding, stops there."""
    short = build_tokenizer(TextEncoderConfig(max_position=10))
    assert short.model_max_length == 10
    ids, mask = CaptionEncoder(short, 32, pad_to_multiple=16).encode(["one two three four five six seven eight nine"])
    assert ids.shape == (1, 10) and mask.all() and ids[0, -1].item() == short.sep_token_id


@pytest.mark.parametrize("multiple, expected", [(1, 7), (4, 8), (6, 12), (32, 32)])
def test_pad_to_multiple_fixes_the_length_without_changing_the_tokens(tokenizer, multiple, expected):
    caps = ["a cat", "a dog on a mat", "red"]  # the longest is 7 tokens with [CLS] and [SEP]
    plain_ids, plain_mask = CaptionEncoder(tokenizer, max_len=32).encode(caps)
    ids, mask = CaptionEncoder(tokenizer, max_len=32, pad_to_multiple=multiple).encode(caps)
    assert plain_ids.shape == (3, 7) and ids.shape == (3, expected)
    assert ids[:, :7].equal(plain_ids) and mask[:, :7].equal(plain_mask)
    assert (mask[:, 7:] == 0).all() and (ids[:, 7:] == tokenizer.pad_token_id).all()


def test_words_keep_the_pieces_of_one_word_together(tokenizer):
    [words] = CaptionEncoder(tokenizer, 32).words(["a rhombus"])
    assert len(words) == 2 and len(words[1]) > 1


def test_augmentation_rates_follow_the_method():
    """Words picked with p=0.2; of those 50% -> [MASK], 10% -> random, 40% deleted (method.md)."""
    aug = CaptionAugment(0.2, mask_id=103, vocab_size=1000, special_ids=frozenset({0, 100, 101, 102, 103}))
    n = 50_000
    words = [[500 + k % 400] for k in range(n)]  # ids 500..899: never special, never 103
    out = np.array(aug(words, np.random.default_rng(0)))
    masked = np.sum(out == 103)
    kept = np.isin(out, np.arange(500, 900)).sum()  # original words (+ random draws that hit 500..899)
    deleted = n - len(out)
    for observed, p in ((masked, 0.2 * 0.5), (deleted, 0.2 * 0.4)):
        assert abs(observed - n * p) < 5 * np.sqrt(n * p * (1 - p)), (observed, n * p)
    random_tokens = len(out) - masked - kept
    assert abs(random_tokens - n * 0.02 * 0.6) < 5 * np.sqrt(n * 0.02)  # 60% of random draws fall outside 500..899
    assert not np.isin(out, [0, 100, 101, 102]).any()


def test_augmentation_treats_a_multi_piece_word_as_one():
    aug = CaptionAugment(0.9999, mask_id=103, vocab_size=1000, special_ids=frozenset({103}))
    rng = np.random.default_rng(1)
    for _ in range(50):
        out = aug([[7, 8, 9]], rng)
        assert out == [103, 103, 103] or out == [] or (len(out) == 3 and 103 not in out)


def test_augmentation_is_reproducible_with_the_same_generator(tokenizer):
    enc = CaptionEncoder(tokenizer, 32, aug_prob=0.5)
    caps = ["a large red circle to the left of a small blue square"] * 8
    a, _ = enc.encode(caps, np.random.default_rng(3))
    b, _ = enc.encode(caps, np.random.default_rng(3))
    plain, _ = enc.encode(caps)
    assert a.equal(b) and not a.equal(plain) and (plain == plain[0]).all()
