"""PMC-CLIP's whole-word masking (--mlm_masking whole_word) against a transcription of its masker.

The transcription below follows PMC-CLIP's src/training/dataset/utils.py (`base_masker`, `encode_mlm`) and the
tokenisation in src/pmc_clip/model/pmc_clip.py (`encode_text`: input and label strings each tokenised with
padding to max_length and truncation). Its two random calls (`random.random()` per word, `random.choice(vocab)`
in the random branch) take their values from arrays instead, and our `mask_whole_words` receives the same arrays:
given the same draws, both must produce the same input ids, attention mask and loss targets (seeded equality,
not a distributional check: the draws are injected into both). Two conditions make the strings comparable with
ids: the random tokens are whole vocabulary words (PMC-CLIP inserts the token's *string*, which re-tokenises to
several pieces for a "##" piece; we insert the id), and the captions fit max_length (after a replacement shortens
the input, PMC-CLIP's re-tokenisation pulls in tokens the first truncation had cut; ours pads). The step's own
random stream (jax.random, not Python's `random`) is checked by its statistics.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medclip.training.mlm import MaskingConfig, mask_batch, mask_whole_words, word_starts

LENGTH = 24
CAPTIONS = [  # words of one token and of several ("x-ray," is four, "(arrow)." six, "xqzw" four word pieces)
    "Chest x-ray, showing a mass (arrow).",
    "CT of the abdomen: xqzw lesion in the liver",
    "Axial MRI shows a mass",
    "Ultrasound image",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from medclip.data.synthetic import write_synthetic_tokenizer

    return write_synthetic_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def pmc_clip_base_masker(caption, vocab, mask_token, pad_token, ratio, tokenizer, random_random, random_choice):
    """PMC-CLIP's `base_masker`, line for line, with its `random.random()` and `random.choice` passed in."""

    def measure_word_len(word):
        token_ids = tokenizer.encode(word)
        return len(token_ids) - 2

    tokens = caption.split()
    bert_input_tokens = []
    output_mask = []
    bert_label_tokens = []
    for i, token in enumerate(tokens):
        prob = random_random()
        if prob < ratio:
            prob /= ratio
            if prob < 0.8:
                word_len = measure_word_len(token)
                bert_input_tokens += [mask_token] * word_len
            elif prob < 0.9:
                rand_token = random_choice(vocab).replace('</w>', '')
                word_len = measure_word_len(rand_token)
                bert_input_tokens += [rand_token]
            else:
                bert_input_tokens += [token]
                word_len = measure_word_len(token)
            output_mask += [1] * word_len
            bert_label_tokens += [token]
        else:
            word_len = measure_word_len(token)
            bert_input_tokens += [token]
            output_mask += [0] * word_len
            bert_label_tokens += [pad_token] * word_len
    return ' '.join(bert_input_tokens), ' '.join(bert_label_tokens)  # encode_mlm's bert_input, bert_label


def pmc_clip_encode(tokenizer, text):
    encoded = tokenizer(text, padding='max_length', truncation=True, max_length=LENGTH)
    return np.asarray(encoded["input_ids"]), np.asarray(encoded["attention_mask"])


def _config(tokenizer):
    return MaskingConfig.from_tokenizer(tokenizer, probability=0.15, masking="whole_word")


def test_word_starts_follow_whitespace_not_word_pieces(tokenizer):
    encoded = tokenizer(CAPTIONS[:1], padding="max_length", truncation=True, max_length=LENGTH, return_tensors="np")
    starts = word_starts(tokenizer, CAPTIONS[:1], encoded["input_ids"].astype(np.int32))[0]
    tokens = tokenizer.convert_ids_to_tokens(encoded["input_ids"][0])
    words, current = [], None
    for token, start in zip(tokens, starts):
        if token in ("[CLS]", "[SEP]", "[PAD]"):
            assert start == 0
            continue
        if start:
            current = []
            words.append(current)
        current.append(token)
    assert len(words) == len(CAPTIONS[0].split())  # "x-ray," is one word of four tokens
    assert words[1] == ["x", "-", "ray", ","]
    with pytest.raises(ValueError, match="does not reproduce"):
        word_starts(tokenizer, CAPTIONS[:1], encoded["input_ids"][:, ::-1].astype(np.int32))


def test_whole_word_masking_matches_pmc_clips_masker_given_the_same_draws(tokenizer):
    config = _config(tokenizer)
    rng = np.random.default_rng(0)
    # Whole vocabulary words: one token each, alone or re-tokenised from their string.
    whole = [i for i in config.replacement_ids() if tokenizer.encode(tokenizer.convert_ids_to_tokens(int(i)),
                                                                     add_special_tokens=False) == [int(i)]]
    seen = {"mask": 0, "random": 0, "keep": 0, "none": 0}
    for trial in range(12):
        draws = rng.uniform(0, 0.3, size=(len(CAPTIONS), LENGTH))  # about half of the words selected
        draws[:, 0] = [0.01, 0.125, 0.14, 0.2]  # every branch at least once: mask, random, keep, not selected
        random_ids = rng.choice(whole, size=(len(CAPTIONS), LENGTH)).astype(np.int32)
        input_ids, attention_mask = (np.stack(x) for x in zip(*(pmc_clip_encode(tokenizer, c) for c in CAPTIONS)))
        assert attention_mask[:, -1].sum() == 0  # the captions fit: see the module docstring
        starts = word_starts(tokenizer, CAPTIONS, input_ids.astype(np.int32))
        ours = jax.device_get(mask_whole_words(jnp.asarray(draws, jnp.float32), jnp.asarray(random_ids),
                                               jnp.asarray(input_ids, jnp.int32), jnp.asarray(attention_mask),
                                               jnp.asarray(starts), config))
        for row, caption in enumerate(CAPTIONS):
            words = iter(range(LENGTH))
            current = {}

            def random_random():
                current["k"] = next(words)
                return float(np.float32(draws[row, current["k"]]))

            def random_choice(vocab):
                return tokenizer.convert_ids_to_tokens(int(random_ids[row, current["k"]]))

            bert_input, bert_label = pmc_clip_base_masker(caption, None, "[MASK]", "[PAD]", 0.15, tokenizer,
                                                          random_random, random_choice)
            their_ids, their_mask = pmc_clip_encode(tokenizer, bert_input)
            their_labels, _ = pmc_clip_encode(tokenizer, bert_label)
            np.testing.assert_array_equal(ours[0][row], their_ids, err_msg=f"{trial}: {bert_input}")
            np.testing.assert_array_equal(ours[1][row], their_mask)
            targets = their_labels != 0  # nll_loss(..., ignore_index=0): [CLS] and [SEP] count
            np.testing.assert_array_equal(ours[2][row], targets, err_msg=bert_label)
            np.testing.assert_array_equal(input_ids[row][targets], their_labels[targets])  # our labels: the input
            for d in draws[row, :len(caption.split())]:
                d = float(np.float32(d))
                seen["none" if d >= 0.15 else "mask" if d / 0.15 < 0.8 else "random" if d / 0.15 < 0.9 else "keep"] += 1
    assert min(seen.values()) > 0, seen


def test_the_steps_random_stream_masks_whole_words_at_bert_rates(tokenizer):
    """jax.random is not Python's `random`: the rates over many words, and that a word's tokens share their fate."""
    config = _config(tokenizer)
    texts = [" ".join(["x-ray", "xqzw", "mass", "chest"] * 2)] * 1024
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=LENGTH, return_tensors="np")
    ids, mask = encoded["input_ids"].astype(np.int32), encoded["attention_mask"].astype(np.int32)
    starts = word_starts(tokenizer, texts, ids)
    masked, new_mask, targets = jax.device_get(jax.jit(lambda r: mask_batch(r, ids, mask, starts, config))(
        jax.random.PRNGKey(0)))
    word = np.cumsum(starts, axis=1) - 1
    eligible = (mask > 0) & ~np.isin(ids, config.special_ids)
    selected_tokens = targets & eligible
    # A word's tokens are all targets or none.
    for row in range(0, 1024, 64):
        for k in range(8):
            assert len(set(selected_tokens[row][(word[row] == k) & eligible[row]])) == 1
    first = starts.astype(bool)
    n_words, n_selected = first.sum(), selected_tokens[first].sum()
    assert abs(n_selected / n_words - 0.15) < 0.015
    # [CLS] and [SEP] are always targets.
    assert targets[:, 0].all() and targets[ids == tokenizer.sep_token_id].all()
    # A row gets shorter by the extra tokens of its randomly replaced words (x-ray: 3 tokens, xqzw: 4 pieces).
    shortened = mask.sum(1) - new_mask.sum(1)
    assert (shortened >= 0).all() and shortened.any()
    assert set(np.unique(shortened)) <= {0, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}
    masked_share = ((masked == config.mask_token_id) & (new_mask > 0)).sum() / selected_tokens.sum()
    assert 0.7 < masked_share < 0.9  # 80% of selected words become [MASK]s (the kept and replaced the rest)
