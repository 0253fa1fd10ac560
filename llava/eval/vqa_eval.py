"""Standard VQA answer normalisation and soft accuracy (TextVQA, VQAv2).

Normalisation follows the EvalAI / VQA evaluation rules, step by step:

1. lower-case; delete "," and "?"; "'s" -> " 's"; strip;
2. newlines and tabs -> spaces; strip;
3. punctuation: each mark of ``PUNCTUATION`` is deleted when the text has it next to a space (or has a
   digit,digit group), otherwise replaced by a space; then a "." not followed by a digit is deleted
   (the reference caps this at 32 replacements, reproduced here);
4. per whitespace token: number words zero..ten (and "none") -> digits, articles a/an/the dropped,
   contractions written without the apostrophe restored ("dont" -> "don't").

Accuracy of a prediction against n human answers (n = 10 in both datasets): for each human answer,
``min(1, matches among the other n-1 answers / 3)``; the mean over the n leave-one-out subsets.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Sequence

logger = logging.getLogger(__name__)

PUNCTUATION: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)

NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}

ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})

# Apostrophe-less spellings -> the standard spelling. Entries are matched against lower-cased tokens,
# so the table is written in lower case ("im" -> "i'm"); the reference's capitalised keys ("Im") can
# never match a lower-cased token and are left out. "somebody'd" -> "somebodyd" is the reference's
# own (inverted) entry, kept because it changes results.
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "isnt": "isn't",
    "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't",
    "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's",
    "somethingd": "something'd", "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd", "thered've": "there'd've",
    "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}

_DIGIT_COMMA_DIGIT = re.compile(r"(?<=\d),+(?=\d)")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_MAX_PERIOD_DELETIONS = 32


def _strip_punctuation(text: str) -> str:
    out = text
    spaced_or_grouped = _DIGIT_COMMA_DIGIT.search(text) is not None
    for mark in PUNCTUATION:
        # The decision looks at the original text; the replacement applies to the running result.
        if spaced_or_grouped or (mark + " ") in text or (" " + mark) in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_MAX_PERIOD_DELETIONS)


def _map_words(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(answer: str) -> str:
    """Normalise one answer string the way the standard VQA / EvalAI evaluation does."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    text = _strip_punctuation(text)
    return _map_words(text)


def vqa_accuracy(prediction: str, gt_answers: Sequence[str], *, normalized: bool = False) -> float:
    """Soft VQA accuracy in [0, 1] of one prediction against the human answers.

    ``normalized=True`` means both sides were already passed through :func:`normalize_answer`.
    """
    if not gt_answers:
        return 0.0
    pred = prediction if normalized else normalize_answer(prediction)
    gts = list(gt_answers) if normalized else [normalize_answer(a) for a in gt_answers]
    n = len(gts)
    matches = Counter(gts)[pred]
    # Leaving out a matching answer leaves matches-1 matches; leaving out any other leaves all of them.
    left_out_match = min(1.0, (matches - 1) / 3) if matches else 0.0
    left_out_other = min(1.0, matches / 3)
    return (matches * left_out_match + (n - matches) * left_out_other) / n
