"""Miniature benchmark fixtures in the on-disk layout of ``playground/data/eval``.

``python -m llava.eval.fixtures --out DIR [--seed N] [--n-per-bench K]`` writes a few questions for each of
GQA, MME, POPE, TextVQA, VQAv2, ScienceQA, MMBench and MMBench-CN, in exactly the file names and formats
that the real data uses (see ``playground/data/eval/README.md``), so that the runners
(``llava.eval.model_vqa_*``) and the scorers (``llava.eval.eval_*``) can be exercised end to end on CPU.
``--benchmarks videomme`` writes Video-MME's: three short mpeg4 clips (8 and 16 frames, 64x48 and 96x64) of moving
shapes, one per duration category, with multiple-choice questions about them (needs PyAV, the video extra).

Everything is synthetic: images are coloured shapes (and, for the text-reading benchmarks, words drawn with
Pillow's default font) on plain backgrounds; questions and answers describe those drawings. Output is a pure
function of ``seed`` and ``n_per_bench``: two runs write byte-identical files.

Image sizes vary on purpose: a square, a 4:3, a tall one and a 3:1 one (900x300) for which LLaVA-NeXT's
``anyres`` grid selection picks a non-square 3x1 grid (1008x336).
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from PIL import Image, ImageDraw, ImageFont

SHORT_ANSWER = "Answer the question using a single word or phrase."
MME_SUFFIX = "Please answer yes or no."
OCR_PREFIX = "Reference OCR token: "

BENCHMARKS = ("gqa", "mme", "pope", "textvqa", "vqav2", "scienceqa", "mmbench", "mmbench_cn")
VIDEO_BENCHMARKS = ("videomme",)  # written only when asked for: they need the video extra (PyAV)

# (width, height); cycled through so every benchmark with >= 3 images gets the wide one.
SIZES = ((320, 240), (900, 300), (256, 256), (240, 360))

COLOURS = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 90, 200),
    "yellow": (240, 200, 20),
    "purple": (148, 80, 189),
    "orange": (250, 127, 14),
    "black": (25, 25, 25),
}
BACKGROUNDS = ((205, 205, 205), (238, 228, 205), (200, 222, 240), (215, 238, 205), (242, 226, 240))
SHAPES = ("circle", "square", "triangle")
WORDS = ("OPEN", "SALE", "CAFE", "EXIT", "RIVER", "NORTH", "LEMON", "PILOT", "MANGO", "DELTA", "TIGER", "STOP")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")


# --------------------------------------------------------------------------------------------- drawing


@dataclass
class Item:
    shape: str
    colour: str


@dataclass
class Scene:
    image: Image.Image
    items: list[Item]
    words: list[str] = field(default_factory=list)

    def has(self, shape: str | None = None, colour: str | None = None) -> bool:
        return any((shape is None or i.shape == shape) and (colour is None or i.colour == colour) for i in self.items)

    def absent_pair(self, rng: random.Random) -> tuple[str, str]:
        """A (colour, shape) combination that is not in the picture."""
        while True:
            colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
            if not self.has(shape, colour):
                return colour, shape


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no size argument
        return ImageFont.load_default()


def draw_scene(
    rng: random.Random, size: tuple[int, int], n_items: int = 2, words: tuple[str, ...] | list[str] = ()
) -> Scene:
    """Draw ``n_items`` shapes left to right (distinct colours) and optionally a row of words below them."""
    w, h = size
    img = Image.new("RGB", size, rng.choice(BACKGROUNDS))
    draw = ImageDraw.Draw(img)
    colours = rng.sample(sorted(COLOURS), n_items)
    # distinct shapes while possible, so "the circle" names one object
    shapes = rng.sample(SHAPES, n_items) if n_items <= len(SHAPES) else [rng.choice(SHAPES) for _ in colours]
    items = [Item(s, c) for s, c in zip(shapes, colours)]
    band = h * 0.62 if words else h  # shapes live in the top band when there is text
    slot = w / n_items
    r = max(6, int(min(slot, band) * 0.32))
    for k, it in enumerate(items):
        cx = int(slot * (k + 0.5) + rng.uniform(-0.08, 0.08) * slot)
        cy = int(band / 2 + rng.uniform(-0.08, 0.08) * band)
        fill = COLOURS[it.colour]
        if it.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif it.shape == "square":
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    if words:
        text = " ".join(words)
        font = _font(max(10, int((h - band) * 0.45)))
        x0, y0 = int(w * 0.06), int(band + (h - band) * 0.2)
        box = draw.textbbox((x0, y0), text, font=font)
        draw.rectangle((box[0] - 4, box[1] - 4, box[2] + 4, box[3] + 4), fill=(255, 255, 255))
        draw.text((x0, y0), text, fill=(0, 0, 0), font=font)
    return Scene(img, items, list(words))


def draw_text_card(rng: random.Random, size: tuple[int, int], lines: list[str]) -> Image.Image:
    """A plain card with one or more lines of text (code, arithmetic, captions)."""
    w, h = size
    img = Image.new("RGB", size, rng.choice(BACKGROUNDS))
    draw = ImageDraw.Draw(img)
    font = _font(max(10, int(h / (len(lines) + 1) * 0.55)))
    step = h / (len(lines) + 1)
    for k, line in enumerate(lines):
        draw.text((int(w * 0.08), int(step * (k + 0.6))), line, fill=(10, 10, 10), font=font)
    return img


def save_image(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        img.save(path, format="JPEG", quality=85)
    else:
        img.save(path, format="PNG")


def image_b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _size(k: int) -> tuple[int, int]:
    return SIZES[k % len(SIZES)]


# --------------------------------------------------------------------------------------------- writers


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _unique_ints(rng: random.Random, n: int, lo: int, hi: int) -> list[int]:
    return sorted(rng.sample(range(lo, hi), n))


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _short(q: str) -> str:
    return f"{q}\n{SHORT_ANSWER}"


def _open_or_binary(rng: random.Random, scene: Scene, k: int) -> tuple[str, str, str, str]:
    """(question, answer, structural type, full answer); alternates open (query) and binary (verify)."""
    it = scene.items[k % len(scene.items)]
    if k % 2 == 0:
        return f"What color is the {it.shape}?", it.colour, "query", f"The {it.shape} is {it.colour}."
    if rng.random() < 0.5:
        obj = f"{it.colour} {it.shape}"
        return f"Is there {_a(obj)}?", "yes", "verify", f"Yes, there is {_a(obj)}."
    obj = " ".join(scene.absent_pair(rng))
    return f"Is there {_a(obj)}?", "no", "verify", f"No, there is no {obj}."


def write_gqa(root: Path, rng: random.Random, n: int) -> None:
    """gqa/llava_gqa_testdev_balanced.jsonl, gqa/data/images/<imageId>.jpg, gqa/data/testdev_balanced_questions.json."""
    n = max(2, n)
    qids = [str(x) for x in _unique_ints(rng, n, 200_000_000, 210_000_000)]
    image_ids = [f"n{x}" for x in _unique_ints(rng, max(2, (n + 1) // 2), 100_000, 999_999)]
    scenes = [draw_scene(rng, _size(k), n_items=2) for k in range(len(image_ids))]
    for iid, sc in zip(image_ids, scenes):
        save_image(sc.image, root / "gqa" / "data" / "images" / f"{iid}.jpg")
    rows, truth = [], {}
    for k, qid in enumerate(qids):
        img = k * len(image_ids) // n  # about two questions per image, at least two images
        question, answer, structural, full = _open_or_binary(rng, scenes[img], k)
        shape = question.rstrip("?").split()[-1]
        if structural == "query":
            semantic = [
                {"operation": "select", "dependencies": [], "argument": f"{shape} (0)"},
                {"operation": "query color", "dependencies": [0], "argument": ""},
            ]
            types = {"structural": "query", "semantic": "attr", "detailed": "colorObj"}
            groups = {"global": "color", "local": f"10q-{shape}_color"}
        else:
            semantic = [
                {"operation": "select", "dependencies": [], "argument": f"{shape} (0)"},
                {"operation": "exist", "dependencies": [0], "argument": "?"},
            ]
            types = {"structural": "verify", "semantic": "obj", "detailed": "existAttr"}
            groups = {"global": None, "local": f"13-{shape}_exist"}
        truth[qid] = {
            "semantic": semantic,
            "entailed": [],
            "equivalent": [qid],
            "question": question,
            "imageId": image_ids[img],
            "isBalanced": True,
            "groups": groups,
            "answer": answer,
            "semanticStr": "; ".join(f"{s['operation']}: {s['argument']}" for s in semantic),
            "annotations": {"answer": {}, "question": {}, "fullAnswer": {}},
            "types": types,
            "fullAnswer": full,
        }
        rows.append({"question_id": qid, "image": f"{image_ids[img]}.jpg", "text": _short(question),
                     "category": "default"})
    _write_jsonl(root / "gqa" / "llava_gqa_testdev_balanced.jsonl", rows)
    _write_json(root / "gqa" / "data" / "testdev_balanced_questions.json", truth)


MME_FLAT = ("existence", "count", "position", "color", "OCR",
            "commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
MME_NESTED = ("posters", "celebrity", "scene", "landmark", "artwork")
MME_TASKS = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
             "OCR", "commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
MME_PNG = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
TITLES = ("The Quiet Harbor", "Seven Lanterns", "Paper Moon Road", "Glass Orchard", "Winter Atlas")
NAMES = ("Ada Brightwell", "Tomas Reyn", "Mira Okafor", "Jon Halvard", "Lena Sorel")
PLACES = ("a beach", "a kitchen", "a forest", "a train station", "a library")
LANDMARKS = ("Harrow Tower", "Bellmont Bridge", "Castle Verin", "Lake Ostra Dam", "Amberfield Arch")
TRANSLATIONS = (("HELLO", "你好"), ("THANK YOU", "谢谢"), ("GOOD NIGHT", "晚安"), ("WATER", "水"))


def _mme_pair(rng: random.Random, task: str, size: tuple[int, int]):
    """One image and two (question, 'Yes'|'No') pairs for an MME subtask; one Yes and one No, in random order."""
    def other(seq, v):
        return rng.choice([x for x in seq if x != v])

    if task in ("existence", "color", "position", "count", "scene"):
        sc = draw_scene(rng, size, n_items=2)
        a, b = sc.items
        if task == "existence":
            colour, shape = sc.absent_pair(rng)
            pairs = [(f"Is there {_a(a.colour + ' ' + a.shape)} in this image?", "Yes"),
                     (f"Is there {_a(colour + ' ' + shape)} in this image?", "No")]
        elif task == "color":
            pairs = [(f"Is the {a.shape} on the left {a.colour}?", "Yes"),
                     (f"Is the {a.shape} on the left {other(sorted(COLOURS), a.colour)}?", "No")]
        elif task == "position":
            pairs = [(f"Is the {a.colour} {a.shape} on the left of the {b.colour} {b.shape}?", "Yes"),
                     (f"Is the {a.colour} {a.shape} on the right of the {b.colour} {b.shape}?", "No")]
        elif task == "count":
            pairs = [("Are there two shapes in this image?", "Yes"),
                     (f"Are there {other(NUMBER_WORDS[3:], 'two')} shapes in this image?", "No")]
        else:
            pairs = [("Does this image show simple shapes on a plain background?", "Yes"),
                     (f"Does this image show {rng.choice(PLACES)}?", "No")]
        img = sc.image
    elif task in ("posters", "celebrity", "landmark", "artwork"):
        pool = {"posters": TITLES, "celebrity": NAMES, "landmark": LANDMARKS, "artwork": TITLES}[task]
        name = rng.choice(pool)
        img = draw_text_card(rng, size, [name])
        phrase = {
            "posters": "Is this movie titled {}?",
            "celebrity": "Is the name shown in the picture {}?",
            "landmark": "Is this a photo of {}?",
            "artwork": "Is this artwork titled {}?",
        }[task]
        pairs = [(phrase.format(name), "Yes"), (phrase.format(other(pool, name)), "No")]
    elif task == "OCR":
        word = rng.choice(WORDS)
        img = draw_scene(rng, size, n_items=1, words=[word]).image
        pairs = [(f'Is the word in the image "{word}"?', "Yes"),
                 (f'Is the word in the image "{other(WORDS, word)}"?', "No")]
    elif task == "numerical_calculation":
        x, y = rng.randint(2, 9), rng.randint(2, 9)
        img = draw_text_card(rng, size, [f"{x} + {y} = ?"])
        pairs = [(f"Is the answer to the arithmetic question in the image {x + y}?", "Yes"),
                 (f"Is the answer to the arithmetic question in the image {x + y + rng.randint(1, 3)}?", "No")]
    elif task == "code_reasoning":
        x, y = rng.randint(2, 9), rng.randint(2, 9)
        img = draw_text_card(rng, size, [f"a = {x}", f"b = {y}", "print(a * b)"])
        pairs = [(f"The output of the code in the image is {x * y}. Is this correct?", "Yes"),
                 (f"The output of the code in the image is {x * y + 1}. Is this correct?", "No")]
    elif task == "text_translation":
        (src, tgt), (_, wrong) = rng.sample(TRANSLATIONS, 2)
        img = draw_text_card(rng, size, [src])
        pairs = [(f'Is it appropriate to translate the text in the image into Chinese as "{tgt}"?', "Yes"),
                 (f'Is it appropriate to translate the text in the image into Chinese as "{wrong}"?', "No")]
    elif task == "commonsense_reasoning":
        sc = draw_scene(rng, size, n_items=2)
        img = sc.image
        pairs = [("Could the objects in this picture be cut out of coloured paper?", "Yes"),
                 ("Is the picture too dark to see anything?", "No")]
    else:
        raise ValueError(f"unknown MME task {task!r}")
    if rng.random() < 0.5:
        pairs.reverse()
    return img, pairs


def write_mme(root: Path, rng: random.Random, n: int) -> None:
    """MME/llava_mme.jsonl and MME/MME_Benchmark_release_version/<task>/ (images + 2-line GT .txt per image)."""
    per_task = max(1, math.ceil(n / 4))
    base = root / "MME" / "MME_Benchmark_release_version"
    rows = []
    k = 0
    for task in MME_TASKS:
        ext = "png" if task in MME_PNG else "jpg"
        for j in range(per_task):
            stem = f"{rng.randint(0, 9999):04d}{j}"
            img, pairs = _mme_pair(rng, task, _size(k))
            k += 1
            if task in MME_NESTED:
                rel_img = f"{task}/images/{stem}.{ext}"
                gt_path = base / task / "questions_answers_YN" / f"{stem}.txt"
            else:
                rel_img = f"{task}/{stem}.{ext}"
                gt_path = base / task / f"{stem}.txt"
            save_image(img, base / rel_img)
            gt_path.parent.mkdir(parents=True, exist_ok=True)
            gt_path.write_text("".join(f"{q} {MME_SUFFIX}\t{a}\n" for q, a in pairs), encoding="utf-8")
            for q, _ in pairs:
                rows.append({"question_id": rel_img, "image": rel_img, "text": _short(q), "category": task})
    _write_jsonl(root / "MME" / "llava_mme.jsonl", rows)


POPE_SPLITS = (("adversarial", 0), ("random", 10_000_000), ("popular", 20_000_000))  # file order, id offset


def write_pope(root: Path, rng: random.Random, n: int) -> None:
    """pope/llava_pope_test.jsonl, pope/coco/coco_pope_<split>.json (jsonl lines), pope/val2014/*.jpg."""
    n = max(2, n)
    n_img = max(2, (n + 1) // 2)
    image_ids = _unique_ints(rng, n_img, 1, 581_929)
    names = [f"COCO_val2014_{i:012d}.jpg" for i in image_ids]
    scenes = [draw_scene(rng, _size(k), n_items=2) for k in range(n_img)]
    for name, sc in zip(names, scenes):
        save_image(sc.image, root / "pope" / "val2014" / name)
    rows = []
    for split, offset in POPE_SPLITS:
        ann = []
        for k in range(n):
            img = (k + offset // 10_000_000) % n_img
            sc = scenes[img]
            if k % 2 == 0:  # every split has at least one "yes" and one "no"
                it = sc.items[k // 2 % len(sc.items)]
                obj, label = f"{it.colour} {it.shape}", "yes"
            else:
                obj, label = " ".join(sc.absent_pair(rng)), "no"
            q = f"Is there {_a(obj)} in the image?"
            ann.append({"question_id": k + 1, "image": names[img], "text": q, "label": label})
            rows.append({"question_id": offset + k + 1, "image": names[img], "text": _short(q), "category": split})
        _write_jsonl(root / "pope" / "coco" / f"coco_pope_{split}.json", ann)
    _write_jsonl(root / "pope" / "llava_pope_test.jsonl", rows)


def _ten_answers(rng: random.Random, right: str, alternatives: list[str]) -> list[str]:
    """Ten annotator answers: mostly ``right`` with a few variants, shuffled."""
    n_right = rng.randint(6, 9)
    ans = [right] * n_right + [rng.choice(alternatives) for _ in range(10 - n_right)]
    rng.shuffle(ans)
    return ans


def write_textvqa(root: Path, rng: random.Random, n: int) -> None:
    """textvqa/llava_textvqa_val_v051_ocr.jsonl, textvqa/TextVQA_0.5.1_val.json, textvqa/train_images/*.jpg."""
    n = max(2, n)
    # From 3 questions on, the first image gets two (the real file repeats image ids); always >= 2 images.
    n_img = n - 1 if n >= 3 else n
    image_ids = [f"{rng.getrandbits(64):016x}" for _ in range(n_img)]
    rows, data = [], []
    qids = _unique_ints(rng, n, 34_602, 39_602)
    cards = []
    for k, iid in enumerate(image_ids):
        words = rng.sample(WORDS, 2)
        sc = draw_scene(rng, _size(k), n_items=1, words=words)
        save_image(sc.image, root / "textvqa" / "train_images" / f"{iid}.jpg")
        cards.append(sc)
    for k in range(n):
        img = k if n_img == n else max(0, k - 1)
        sc, iid = cards[img], image_ids[img]
        w, h = _size(img)
        if k == 1:
            q = f"What color is the {sc.items[0].shape}?"
            answers = _ten_answers(rng, sc.items[0].colour, [f"dark {sc.items[0].colour}", "unanswerable"])
        else:
            q = "What is the first word written in the white box?"
            answers = _ten_answers(rng, sc.words[0].lower(), [" ".join(sc.words).lower(), sc.words[0]])
        # OCR tokens as a reader would return them; the last question has none, as 115 real ones do.
        ocr = [] if k == n - 1 and n > 2 else list(sc.words) + [rng.choice(WORDS).lower()[:3]]
        text = f"{q}\n{OCR_PREFIX}{', '.join(ocr)}\n{SHORT_ANSWER}"
        rows.append({"question_id": iid, "image": f"{iid}.jpg", "text": text, "category": "default"})
        data.append({
            "question": q,
            "image_id": iid,
            "image_classes": ["Poster"],
            "flickr_original_url": f"https://example.invalid/{iid}_o.jpg",
            "flickr_300k_url": f"https://example.invalid/{iid}_z.jpg",
            "image_width": w,
            "image_height": h,
            "answers": answers,
            "question_tokens": q.rstrip("?").lower().split(),
            "question_id": qids[k],
            "set_name": "val",
        })
    _write_jsonl(root / "textvqa" / "llava_textvqa_val_v051_ocr.jsonl", rows)
    _write_json(root / "textvqa" / "TextVQA_0.5.1_val.json",
                {"dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1", "data": data})


def write_vqav2(root: Path, rng: random.Random, n: int) -> None:
    """vqav2/llava_vqav2_mscoco_test-dev2015.jsonl (run), vqav2/llava_vqav2_mscoco_test2015.jsonl (the superset
    the submission is padded to), vqav2/test2015/*.jpg."""
    n = max(2, n)
    n_img = max(2, (n + 1) // 2) + 1  # the last image belongs to test2015 only
    image_ids = _unique_ints(rng, n_img, 1, 581_929)
    scenes = [draw_scene(rng, _size(k), n_items=2) for k in range(n_img)]
    names = [f"COCO_test2015_{i:012d}.jpg" for i in image_ids]
    for name, sc in zip(names, scenes):
        save_image(sc.image, root / "vqav2" / "test2015" / name)
    n_dev_img = n_img - 1
    dev, full = [], []
    for img in range(n_img):
        for j in range(2):
            order = j * n_dev_img + img  # test-dev takes the first question of every image first
            sc = scenes[img]
            if j == 0:
                q = f"What color is the {sc.items[0].shape} on the left?"
            else:
                q = "How many shapes are there?"
            qid = image_ids[img] * 1000 + j
            row = {"question_id": qid, "image": names[img], "text": _short(q), "category": "default"}
            full.append(row)
            if img < n_dev_img and order < n:
                dev.append(row)
    _write_jsonl(root / "vqav2" / "llava_vqav2_mscoco_test-dev2015.jsonl", dev)
    _write_jsonl(root / "vqav2" / "llava_vqav2_mscoco_test2015.jsonl", full)


def write_scienceqa(root: Path, rng: random.Random, n: int) -> None:
    """scienceqa/llava_test_CQM-A.json (array), problems.json, pid_splits.json, images/test/<pid>/image.png."""
    n = max(2, n)
    pids = [str(x) for x in _unique_ints(rng, n + 1, 1, 21_208)]
    test_pids, train_pid = pids[:n], pids[n]
    problems, entries = {}, []
    letters = "ABCDE"
    for k, pid in enumerate(pids):
        with_image = k % 2 == 0
        if with_image:
            sc = draw_scene(rng, _size(k), n_items=2)
            if k != n:
                save_image(sc.image, root / "scienceqa" / "images" / "test" / pid / "image.png")
            it = sc.items[0]
            question = "Which shape is on the left?"
            right = it.shape
            choices = [right] + rng.sample([s for s in SHAPES if s != right], 1 + (k // 2) % 2)
            hint = "Look at the picture."
        else:
            x, y = rng.randint(2, 20), rng.randint(2, 20)
            question = f"What is {x} plus {y}?"
            right = str(x + y)
            choices = [right, str(x + y + 1), str(abs(x - y))]  # distinct: x, y >= 2
            hint = ""
        rng.shuffle(choices)
        answer = choices.index(right)
        problems[pid] = {
            "question": question,
            "choices": choices,
            "answer": answer,
            "hint": hint,
            "image": "image.png" if with_image else None,
            "task": "closed choice",
            "grade": f"grade{rng.randint(1, 8)}",
            "subject": "natural science" if with_image else "language science",
            "topic": "shapes" if with_image else "arithmetic",
            "category": "Identify shapes" if with_image else "Add numbers",
            "skill": "synthetic",
            "lecture": "",
            "solution": f"The answer is {right}.",
            "split": "test" if pid in test_pids else "train",
        }
        if pid == train_pid:
            continue
        lines = ["<image>"] if with_image else []
        if hint:
            lines.append(f"Context: {hint}")
        lines.append(question)
        lines += [f"{letters[i]}. {c}" for i, c in enumerate(choices)]
        entry = {"id": pid}
        if with_image:
            entry["image"] = f"{pid}/image.png"
        entry["conversations"] = [{"from": "human", "value": "\n".join(lines)},
                                  {"from": "gpt", "value": letters[answer]}]
        entries.append(entry)
    _write_json(root / "scienceqa" / "llava_test_CQM-A.json", entries)
    _write_json(root / "scienceqa" / "problems.json", problems)
    _write_json(root / "scienceqa" / "pid_splits.json", {
        "train": [train_pid], "val": [], "test": test_pids, "trainval": [train_pid],
        "minitrain": [train_pid], "minival": [], "minitest": test_pids})


MMB_COLUMNS = ("index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
               "l2-category", "comment", "split")
MMB_TEXT = {
    "en": {"colour": "What is the color of the {}?", "shape": "Which shape is drawn in {} color?",
           "count": "How many shapes are in the image?", "hint": "The picture shows simple drawings.",
           "colours": {c: c for c in COLOURS}, "shapes": {s: s for s in SHAPES}},
    "cn": {"colour": "图中{}是什么颜色？", "shape": "图中{}色的是什么形状？", "count": "图中有几个图形？",
           "hint": "图片中是简单的几何图形。",
           "colours": {"red": "红", "green": "绿", "blue": "蓝", "yellow": "黄", "purple": "紫",
                       "orange": "橙", "black": "黑"},
           "shapes": {"circle": "圆形", "square": "正方形", "triangle": "三角形"}},
}


def _mmbench_rows(rng: random.Random, n: int, lang: str) -> list[dict]:
    t = MMB_TEXT[lang]
    n = max(2, n)
    mains = []
    for i in range(n):
        k_opts = (4, 3, 2)[i % 3]
        w, h = ((128, 96), (96, 128), (192, 64))[i % 3]
        sc = draw_scene(rng, (w, h), n_items=2 if i % 3 != 2 else 3)
        it = sc.items[0]
        kind = ("colour", "shape", "count")[i % 3]
        if kind == "colour":
            question = t["colour"].format(t["shapes"][it.shape] if lang == "cn" else it.shape)
            right = t["colours"][it.colour]
            pool = [t["colours"][c] for c in sorted(COLOURS) if c != it.colour]
            category, l2 = "attribute_recognition", "finegrained_perception (instance-level)"
        elif kind == "shape":
            question = t["shape"].format(t["colours"][it.colour])
            right = t["shapes"][it.shape]
            pool = [t["shapes"][s] for s in SHAPES if s != it.shape]
            category, l2 = "object_localization", "finegrained_perception (instance-level)"
        else:
            question = t["count"]
            right = str(len(sc.items))
            pool = [str(x) for x in (1, 2, 4, 5) if x != len(sc.items)]
            category, l2 = "image_scene", "coarse_perception"
        options = [right] + rng.sample(pool, min(len(pool), k_opts - 1))
        rng.shuffle(options)
        mains.append((i, question, t["hint"] if i % 2 == 1 else "", options, options.index(right),
                      category, l2, image_b64(sc.image)))
    rows = []
    for shift in range(4):  # circular variants: index + shift * 1e6, options rotated left by ``shift``
        for idx, question, hint, options, ans, category, l2, img in mains:
            k = len(options)
            if shift >= k:
                continue
            rot = options[shift:] + options[:shift]
            row = {"index": idx + shift * 1_000_000, "question": question, "hint": hint}
            for j, letter in enumerate("ABCD"):
                row[letter] = rot[j] if j < k else ""
            row.update({"answer": "ABCD"[(ans - shift) % k], "category": category, "image": img,
                        "source": "synthetic", "l2-category": l2, "comment": "", "split": "dev"})
            rows.append(row)
    return rows


def _write_tsv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=MMB_COLUMNS, delimiter="\t", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def write_mmbench(root: Path, rng: random.Random, n: int) -> None:
    """mmbench/mmbench_dev_20230712.tsv with base64 images and circular variant rows."""
    _write_tsv(root / "mmbench" / "mmbench_dev_20230712.tsv", _mmbench_rows(rng, n, "en"))


def write_mmbench_cn(root: Path, rng: random.Random, n: int) -> None:
    """mmbench_cn/mmbench_dev_cn_20231003.tsv (same columns, Chinese text)."""
    _write_tsv(root / "mmbench_cn" / "mmbench_dev_cn_20231003.tsv", _mmbench_rows(rng, n, "cn"))


# Video-MME: one clip per duration category, video ids in that category's range of the real numbering (short
# 001-300, medium 301-600, long 601-900); (frames, fps, (width, height)) per clip.
VMME_CLIPS = (("short", 8, 4, (64, 48)), ("medium", 16, 8, (96, 64)), ("long", 16, 4, (64, 48)))
VMME_ID_RANGES = {"short": (1, 300), "medium": (301, 600), "long": (601, 900)}
VMME_DOMAINS = (("Knowledge", "Astronomy"), ("Film & Television", "Animation"), ("Life Record", "Pet & Animal"))
DIRECTIONS = ("left to right", "right to left", "top to bottom", "bottom to top")
YOUTUBE_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def draw_clip(rng: random.Random, size: tuple[int, int], n_frames: int, colour: str, count: int,
              direction: str):
    """``n_frames`` RGB frames (uint8, (T, H, W, 3)) of ``count`` shapes of one colour moving in ``direction``."""
    import numpy as np

    w, h = size
    background = rng.choice(BACKGROUNDS)
    shapes = [rng.choice(("circle", "square")) for _ in range(count)]
    r = max(3, min(w, h) // 8)
    frames = []
    for t in range(n_frames):
        img = Image.new("RGB", size, background)
        draw = ImageDraw.Draw(img)
        progress = t / max(1, n_frames - 1)
        for i, shape in enumerate(shapes):
            lane = (i + 1) / (count + 1)
            if direction in ("left to right", "right to left"):
                along = progress if direction == "left to right" else 1 - progress
                cx, cy = r + along * (w - 2 * r), lane * h
            else:
                along = progress if direction == "top to bottom" else 1 - progress
                cx, cy = lane * w, r + along * (h - 2 * r)
            box = (cx - r, cy - r, cx + r, cy + r)
            (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
        frames.append(np.asarray(img))
    return np.stack(frames)


def _vmme_options(rng: random.Random, right: str, pool: list[str]) -> tuple[list[str], str]:
    """Four "X. text." options with ``right`` at a random letter, and that letter."""
    texts = [right] + rng.sample([p for p in pool if p != right], 3)
    rng.shuffle(texts)
    return [f"{'ABCD'[k]}. {t}." for k, t in enumerate(texts)], "ABCD"[texts.index(right)]


def write_videomme(root: Path, rng: random.Random, n: int) -> None:
    """videomme/videomme.json (the official annotation layout), videomme/data/<youtube id>.mp4 (lmms-eval's
    layout) and videomme/llava_videomme.jsonl (the runner's question file): three clips, one per duration, with
    ceil(n / 3) questions each (at most 3: colour, direction of motion, count)."""
    from llava.eval.eval_videomme import question_rows, read_annotation
    from llava.video import encode_video

    per_video = min(3, max(1, math.ceil(n / 3)))
    videos = []
    for k, (duration, n_frames, fps, size) in enumerate(VMME_CLIPS):
        video_id = f"{rng.randint(*VMME_ID_RANGES[duration]):03d}"
        youtube_id = "".join(rng.choice(YOUTUBE_ALPHABET) for _ in range(11))
        colour, count, direction = rng.choice(sorted(COLOURS)), rng.randint(1, 3), rng.choice(DIRECTIONS)
        encode_video(root / "videomme" / "data" / f"{youtube_id}.mp4",
                     draw_clip(rng, size, n_frames, colour, count, direction), fps=fps)
        asked = [
            ("Attribute Perception", "What color are the moving shapes in the video?", colour, sorted(COLOURS)),
            ("Temporal Perception", "In which direction do the shapes move?", direction, list(DIRECTIONS)),
            ("Counting Problem", "How many shapes are in the video?", str(count), ["1", "2", "3", "4"]),
        ][:per_video]
        questions = []
        for j, (task, question, right, pool) in enumerate(asked, start=1):
            options, answer = _vmme_options(rng, right, pool)
            questions.append({"question_id": f"{video_id}-{j}", "task_type": task, "question": question,
                              "choices": options, "answer": answer})
        domain, sub = VMME_DOMAINS[k]
        videos.append({"video_id": video_id, "duration_category": duration, "video_category": domain,
                       "video_sub_category": sub, "url": f"https://www.youtube.com/watch?v={youtube_id}",
                       "questions": questions})
    _write_json(root / "videomme" / "videomme.json", videos)
    _write_jsonl(root / "videomme" / "llava_videomme.jsonl",
                 question_rows(read_annotation(str(root / "videomme" / "videomme.json"))))


WRITERS: dict[str, Callable[[Path, random.Random, int], None]] = {
    "gqa": write_gqa,
    "mme": write_mme,
    "pope": write_pope,
    "textvqa": write_textvqa,
    "vqav2": write_vqav2,
    "scienceqa": write_scienceqa,
    "mmbench": write_mmbench,
    "mmbench_cn": write_mmbench_cn,
    "videomme": write_videomme,
}

# The files each benchmark's question step reads; used to refuse overwriting real data.
QUESTION_FILES = {
    "gqa": "gqa/llava_gqa_testdev_balanced.jsonl",
    "mme": "MME/llava_mme.jsonl",
    "pope": "pope/llava_pope_test.jsonl",
    "textvqa": "textvqa/llava_textvqa_val_v051_ocr.jsonl",
    "vqav2": "vqav2/llava_vqav2_mscoco_test-dev2015.jsonl",
    "scienceqa": "scienceqa/llava_test_CQM-A.json",
    "mmbench": "mmbench/mmbench_dev_20230712.tsv",
    "mmbench_cn": "mmbench_cn/mmbench_dev_cn_20231003.tsv",
    "videomme": "videomme/llava_videomme.jsonl",
}


def write_fixtures(out: str | Path, seed: int = 0, n_per_bench: int = 4,
                   benchmarks: tuple[str, ...] | list[str] | None = None) -> Path:
    """Write the miniature benchmarks under ``out`` (the equivalent of ``playground/data/eval``).

    Each benchmark draws from its own RNG derived from ``seed`` and its name, so selecting a subset does not
    change the files of the others. ``benchmarks=None`` writes the image ones (``BENCHMARKS``). Returns ``out`` as
    a Path.
    """
    root = Path(out)
    names = BENCHMARKS if benchmarks is None else tuple(benchmarks)
    unknown = [b for b in names if b not in WRITERS]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS + VIDEO_BENCHMARKS)}")
    if n_per_bench < 1:
        raise ValueError(f"n_per_bench must be >= 1, got {n_per_bench}")
    for name in names:
        rng = random.Random(f"{seed}:{name}")
        WRITERS[name](root, rng, n_per_bench)
    return root


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m llava.eval.fixtures", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output root, laid out like playground/data/eval")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-per-bench", type=int, default=4,
                   help="questions per benchmark (per split for POPE; MME gets ceil(K/4) images per subtask, "
                        "2 questions each; MMBench gets K questions plus their circular variants; Video-MME gets 3 clips "
                        "with ceil(K/3) questions each, at most 3)")
    p.add_argument("--benchmarks", default=",".join(BENCHMARKS),
                   help=f"comma-separated subset of: {', '.join(BENCHMARKS + VIDEO_BENCHMARKS)} (default: the "
                        "image ones; the video ones need the video extra)")
    p.add_argument("--force", action="store_true", help="overwrite question files that already exist")
    args = p.parse_args(argv)
    names = [b.strip() for b in args.benchmarks.split(",") if b.strip()]
    bad = [b for b in names if b not in WRITERS]
    if bad:
        p.error(f"unknown benchmark(s) {', '.join(bad)}; choose from {', '.join(BENCHMARKS + VIDEO_BENCHMARKS)}")
    existing = [QUESTION_FILES[b] for b in names if (Path(args.out) / QUESTION_FILES[b]).exists()]
    if existing and not args.force:
        p.error(f"{args.out} already has {', '.join(existing)}; refusing to overwrite (pass --force, "
                "and never point --out at real benchmark data)")
    if args.n_per_bench < 1:
        p.error("--n-per-bench must be >= 1")
    root = write_fixtures(args.out, seed=args.seed, n_per_bench=args.n_per_bench, benchmarks=names)
    files = [f for f in root.rglob("*") if f.is_file()]
    size = sum(f.stat().st_size for f in files)
    print(f"wrote {len(files)} files ({size / 1024:.0f} KiB) for {', '.join(names)} under {root}")


if __name__ == "__main__":
    from llava.utils import cli

    cli(main)
