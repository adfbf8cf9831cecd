"""A tiny offline stand-in for the umt5-xxl tokenizer, plus the prompts used by the text fixtures.

The tokenizer is a SentencePiece-style Unigram model trained with the `tokenizers` library on a
generated corpus, so that no download is needed. Its `tokenizer.json` is written by transformers'
`T5Tokenizer.save_pretrained`, i.e. in exactly the form that transformers (and therefore WanPipeline)
rebuilds and uses when it loads a T5 tokenizer directory:

  normalizer      Precompiled charsmap (a subset of SentencePiece's nmt_nfkc rules, see below)
  pre_tokenizer   Sequence[WhitespaceSplit, Metaspace("▁", prepend_scheme="always", split=True)]
  model           Unigram, unk_id 2, no byte fallback
  post_processor  TemplateProcessing "$A </s>"
  decoder         Metaspace
  specials        <pad>=0, </s>=1, <unk>=2, and EXTRA_IDS sentinels <extra_id_N> at the end of the vocab
                  (in reverse order, as in T5/umt5)

Loading that file with the `tokenizers` library (Python or the Rust crate) therefore gives the same ids
as `AutoTokenizer.from_pretrained(dir)`; make_fixtures.py checks this on many strings.

The charsmap: umt5-xxl normalises with SentencePiece's nmt_nfkc charsmap (about 240 KB). Here the same
rules are compiled for a small set of code points only (controls, Latin-1, general punctuation and
spaces, CJK punctuation, full-width forms, ligatures, number forms, circled numbers, and a few
base + combining-mark pairs), which keeps the file small but exercises the same Precompiled code path.
The mapping of every chosen code point is read from a freshly compiled nmt_nfkc charsmap, so it
agrees with the real one on those code points.
"""

from __future__ import annotations

import os
import random
import tempfile

EXTRA_IDS = 4
VOCAB_SIZE = 400  # total, including the 3 specials and the EXTRA_IDS sentinels

# Code points whose nmt_nfkc mapping is copied into the small charsmap.
CHARSMAP_RANGES = [
    (0x0000, 0x0080), (0x0080, 0x0100), (0x2000, 0x2070), (0x2150, 0x2190), (0x2460, 0x2474),
    (0x3000, 0x3040), (0xFB00, 0xFB07), (0xFF00, 0xFFF0),
]
COMBINING_BASES = "aeiouyncAEIOUYNC"
COMBINING_MARKS = "\u0300\u0301\u0302\u0303\u0308\u0327"


# --------------------------------------------------------------------------------------------
# SentencePiece charsmap compilation (sentencepiece is only used as a charsmap compiler; the
# protobuf is parsed by hand so that the protobuf package is not needed)

def _varint(b: bytes, i: int) -> tuple[int, int]:
    r = s = 0
    while True:
        c = b[i]
        i += 1
        r |= (c & 0x7F) << s
        s += 7
        if c < 0x80:
            return r, i


def _proto_fields(b: bytes):
    i = 0
    while i < len(b):
        key, i = _varint(b, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            v, i = _varint(b, i)
        elif wire == 1:
            v, i = b[i:i + 8], i + 8
        elif wire == 5:
            v, i = b[i:i + 4], i + 4
        elif wire == 2:
            n, i = _varint(b, i)
            v, i = b[i:i + n], i + n
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, v


def _compile_charsmap(rule_name: str | None = None, rules: list[tuple[str, str]] | None = None) -> bytes:
    """Train a throw-away SentencePiece model and return its NormalizerSpec.precompiled_charsmap."""
    import sentencepiece as spm

    with tempfile.TemporaryDirectory() as d:
        corpus = os.path.join(d, "corpus.txt")
        with open(corpus, "w", encoding="utf-8") as fh:
            fh.write("abc def ghi\n" * 20)
        kwargs = dict(input=corpus, model_prefix=os.path.join(d, "m"), vocab_size=8, model_type="char",
                      minloglevel=2, num_threads=1)
        if rules is not None:
            tsv = os.path.join(d, "rules.tsv")
            with open(tsv, "w", encoding="utf-8") as fh:
                for src, dst in rules:
                    fh.write(" ".join(f"{ord(c):X}" for c in src) + "\t"
                             + " ".join(f"{ord(c):X}" for c in dst) + "\n")
            kwargs["normalization_rule_tsv"] = tsv
        else:
            kwargs["normalization_rule_name"] = rule_name
        spm.SentencePieceTrainer.train(**kwargs)
        with open(os.path.join(d, "m.model"), "rb") as fh:
            proto = fh.read()
    normalizer_spec = next(v for f, v in _proto_fields(proto) if f == 3)
    return next(v for f, v in _proto_fields(normalizer_spec) if f == 2)


def small_nfkc_rules() -> list[tuple[str, str]]:
    """(source, target) pairs: nmt_nfkc's mapping restricted to CHARSMAP_RANGES + combining pairs."""
    from tokenizers import normalizers

    full = normalizers.Precompiled(_compile_charsmap(rule_name="nmt_nfkc"))
    sources = [chr(cp) for lo, hi in CHARSMAP_RANGES for cp in range(lo, hi) if cp != 0]
    sources += [b + m for b in COMBINING_BASES for m in COMBINING_MARKS]
    rules = []
    for src in sources:
        dst = full.normalize_str(src)
        if dst != src:
            rules.append((src, dst))
    return rules


def small_charsmap() -> bytes:
    return _compile_charsmap(rules=small_nfkc_rules())


# --------------------------------------------------------------------------------------------
# Training corpus and tokenizer

_SUBJECTS = ["a red fox", "the old man", "a small girl", "two dogs", "a black cat", "the river", "a tall tree",
             "an astronaut", "a robot", "the city", "a white horse", "three birds", "a young woman",
             "the ocean", "a yellow taxi", "the mountain", "a wooden boat", "a golden retriever",
             "the train", "a paper lantern", "a dragon", "the children", "a baker", "an owl"]
_VERBS = ["running through", "walking across", "flying over", "sleeping under", "dancing in", "jumping into",
          "looking at", "swimming in", "climbing", "sitting near", "painting", "crossing", "racing along",
          "floating above", "hiding behind", "playing with", "reading beside", "drifting down"]
_OBJECTS = ["the snow", "a green field", "the forest", "a busy street", "the sunset", "the quiet lake",
            "a crowded market", "the desert", "a frozen river", "the garden", "a neon sign", "the clouds",
            "an ancient temple", "the beach", "a stone bridge", "the rainy window", "a candle", "the stars"]
_STYLES = ["cinematic lighting", "slow motion", "aerial view", "close-up shot", "high detail", "soft focus",
           "warm colors", "in the style of an oil painting", "at night", "during a storm", "4k video",
           "handheld camera", "golden hour", "foggy morning", "vivid colors", "black and white film"]
_ADJECTIVES = ["bright", "dark", "misty", "sparkling", "gentle", "wild", "quiet", "glowing", "colorful",
               "peaceful", "mysterious", "dramatic", "crystal", "velvet", "rusty", "silver", "purple",
               "orange", "tiny", "enormous", "shimmering", "frosty", "dusty", "elegant", "playful",
               "lonely", "cheerful", "majestic", "translucent", "vintage", "futuristic", "magnificent"]
_NOUNS = ["waterfall", "lighthouse", "volcano", "meadow", "canyon", "harbor", "village", "castle", "jungle",
          "glacier", "library", "kitchen", "festival", "umbrella", "bicycle", "butterfly", "penguin", "tiger",
          "elephant", "dolphin", "sunflower", "pumpkin", "rainbow", "thunder", "lightning", "skyscraper",
          "submarine", "helicopter", "orchestra", "violin", "guitar", "carousel", "waterwheel", "windmill",
          "balloon", "kitten", "puppy", "squirrel", "hedgehog", "jellyfish", "octopus", "telescope"]
_DETAILS = ["with falling leaves", "with drifting smoke", "with sparkling reflections", "with heavy rain",
            "with swirling dust", "with floating lanterns", "with glittering confetti", "with blooming flowers",
            "with crashing waves", "with flickering candles", "with scattered petals", "with morning dew",
            "under a full moon", "beneath purple skies", "beside a roaring fireplace", "near an abandoned station",
            "inside a glass greenhouse", "behind a wrought iron gate", "above the rooftops", "among tall grasses",
            "against a mountain backdrop", "through a narrow alley", "toward the horizon", "around a campfire",
            "photorealistic", "watercolor illustration", "anime style", "documentary footage", "macro lens",
            "wide angle", "tracking shot", "time lapse", "steady zoom", "shallow depth of field",
            "dynamic composition", "symmetrical framing", "pastel palette", "moody atmosphere",
            "volumetric light", "dreamy haze", "sharp contrast", "natural sunlight", "studio backdrop"]
_EXTRA = [
    "café crème and brûlée on a table", "a naïve façade in Zürich", "señor García eats jalapeño",
    "the fiancée wore a résumé", "Ärger über Größe und Übermut", "São Paulo à noite", "élan vital",
    "北京 的 天气 很 好", "东京 夜景 美丽", "山 和 水", "我 喜欢 猫 和 狗", "小 狐狸 在 雪 中 奔跑",
    "東京 の 夜", "さくら が 咲く", "한국 의 가을", "Москва зимой", "Ελλάδα και θάλασσα",
]


def training_corpus(seed: int = 4242, n: int = 420) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
        if rng.random() < 0.6:
            s += ", " + rng.choice(_STYLES)
        if rng.random() < 0.7:
            s += f", {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)}"
        if rng.random() < 0.7:
            s += f", {rng.choice(_DETAILS)}"
        if rng.random() < 0.2:
            s = s[0].upper() + s[1:] + "."
        lines.append(s)
    lines += _EXTRA * 3
    return lines


def train_tokenizer_json(seed: int = 4242):
    """Return (vocab_with_scores, charsmap) of the trained Unigram model (before the sentinels)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import json

    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import Unigram
    from tokenizers.trainers import UnigramTrainer

    charsmap = small_charsmap()
    tok = Tokenizer(Unigram())
    tok.normalizer = normalizers.Precompiled(charsmap)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
    ])
    trainer = UnigramTrainer(vocab_size=VOCAB_SIZE - EXTRA_IDS, special_tokens=["<pad>", "</s>", "<unk>"],
                             unk_token="<unk>", show_progress=False, max_piece_length=12)
    tok.train_from_iterator(training_corpus(seed), trainer=trainer)
    # Scores are rounded to 6 decimals: the trainer's last digits vary from run to run (hash-map
    # iteration order), and short decimals parse to the same f64 in every JSON reader (serde_json's
    # default float parser can be 1 ulp off on 17-digit numbers).
    vocab = [(p, round(float(s), 6)) for p, s in json.loads(tok.to_str())["model"]["vocab"]]
    assert [p for p, _ in vocab[:3]] == ["<pad>", "</s>", "<unk>"], vocab[:4]
    # Required characters that the pruning dropped are re-added by the trainer with scores
    # min_score - k * 1e-4, k following hash-map order; give them all the lowest of those scores.
    # Then sort (pieces with equal scores also come out in varying order) so that ids are stable.
    multi_min = min(sc for p, sc in vocab[3:] if len(p) > 1)
    tail = [i for i, (p, sc) in enumerate(vocab) if i >= 3 and len(p) == 1 and sc < multi_min]
    if tail:
        floor = min(vocab[i][1] for i in tail)
        for i in tail:
            vocab[i] = (vocab[i][0], floor)
    vocab = vocab[:3] + sorted(vocab[3:], key=lambda ps: (-ps[1], ps[0]))
    return vocab, charsmap


def build_tokenizer(out_dir: str, seed: int = 4242):
    """Train and save the tiny T5-style tokenizer to out_dir (tokenizer.json + configs)."""
    from transformers import T5TokenizerFast

    vocab, charsmap = train_tokenizer_json(seed)
    # T5/umt5 layout: sentinels at the end of the vocabulary, <extra_id_{n-1}> first.
    vocab = vocab + [(f"<extra_id_{i}>", 0.0) for i in range(EXTRA_IDS - 1, -1, -1)]
    tok = T5TokenizerFast(vocab=vocab, _spm_precompiled_charsmap=charsmap, extra_ids=EXTRA_IDS,
                          model_max_length=512)
    tok.save_pretrained(out_dir)
    return tok


# --------------------------------------------------------------------------------------------
# Prompts for text/tiny/cases.json

def long_prompt(seed: int = 77, words: int = 280) -> str:
    rng = random.Random(seed)
    pool = " ".join(_SUBJECTS + _VERBS + _OBJECTS + _STYLES + _ADJECTIVES + _NOUNS + _DETAILS).split() + [
        "xylophone", "quixotic", "zephyr", "jubilant", "kaleidoscope", "wizardry", "björk", "fjord"]
    return " ".join(rng.choice(pool) for _ in range(words))


def text_prompts() -> list[str]:
    return [
        "a red fox running through snow, cinematic lighting",
        "  \t a &amp;amp; b &lt;cat&gt;\n\n  sitting   near\tthe\r\nquiet lake &quot;at night&quot;  ",
        "Café crème in Zürich, ﬁne ２０２４ ＶＩＤＥＯ… 小 狐狸 在 雪 中 奔跑, 猫 Ω 🦊 cafe\u0301 a\u200bb ½",
        long_prompt(),
        "",
    ]
