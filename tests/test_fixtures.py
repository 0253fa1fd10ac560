"""The miniature benchmarks of ``llava.eval.fixtures``: files, formats, determinism."""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from PIL import Image

from llava.eval import fixtures

SHORT = "\nAnswer the question using a single word or phrase."

EXPECTED_FILES = [
    "gqa/llava_gqa_testdev_balanced.jsonl",
    "gqa/data/testdev_balanced_questions.json",
    "MME/llava_mme.jsonl",
    "pope/llava_pope_test.jsonl",
    "pope/coco/coco_pope_adversarial.json",
    "pope/coco/coco_pope_popular.json",
    "pope/coco/coco_pope_random.json",
    "textvqa/llava_textvqa_val_v051_ocr.jsonl",
    "textvqa/TextVQA_0.5.1_val.json",
    "vqav2/llava_vqav2_mscoco_test-dev2015.jsonl",
    "vqav2/llava_vqav2_mscoco_test2015.jsonl",
    "scienceqa/llava_test_CQM-A.json",
    "scienceqa/problems.json",
    "scienceqa/pid_splits.json",
    "mmbench/mmbench_dev_20230712.tsv",
    "mmbench_cn/mmbench_dev_cn_20231003.tsv",
]

# LLaVA-1.6 grid pinpoints as (width, height).
PINPOINTS = [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_tsv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def best_resolution(w: int, h: int) -> tuple[int, int]:
    """LLaVA-NeXT's rule: most effective pixels after fitting, then least wasted area."""
    best, key = None, None
    for cw, ch in PINPOINTS:
        s = min(cw / w, ch / h)
        eff = min(int(w * s) * int(h * s), w * h)
        k = (eff, -(cw * ch - eff))
        if key is None or k > key:
            best, key = (cw, ch), k
    return best


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return fixtures.write_fixtures(tmp_path_factory.mktemp("fx"), seed=0, n_per_bench=4)


def test_expected_files_exist_and_small(root):
    for rel in EXPECTED_FILES:
        assert (root / rel).is_file(), rel
    total = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    assert total < 2 * 1024 * 1024


def test_images_are_rgb_with_varied_sizes(root):
    sizes = set()
    for f in root.rglob("*"):
        if f.suffix in (".jpg", ".png"):
            with Image.open(f) as im:
                assert im.mode == "RGB", f
                sizes.add(im.size)
    assert any(w != h for w, h in sizes)
    wide = [(w, h) for w, h in sizes if w >= 2.5 * h]
    assert wide
    gw, gh = best_resolution(*wide[0])
    assert gw != gh and (gw // 336, gh // 336) == (3, 1)
    try:
        from llava.mm_utils import select_best_resolution
    except ImportError:
        return
    assert select_best_resolution(wide[0], PINPOINTS) == (gw, gh)


def _check_loader_rows(rows, image_dir: Path, id_type):
    assert len(rows) >= 2
    for r in rows:
        assert set(r) == {"question_id", "image", "text", "category"}
        assert isinstance(r["question_id"], id_type)
        assert (image_dir / r["image"]).is_file(), r["image"]


def test_chunking_into_two_leaves_no_empty_chunk(root):
    for rel in ("gqa/llava_gqa_testdev_balanced.jsonl", "vqav2/llava_vqav2_mscoco_test-dev2015.jsonl",
                "textvqa/llava_textvqa_val_v051_ocr.jsonl", "pope/llava_pope_test.jsonl", "MME/llava_mme.jsonl"):
        n = len(read_jsonl(root / rel))
        size = math.ceil(n / 2)
        assert len([i for i in range(0, n, size)]) == 2, rel


def test_gqa(root):
    rows = read_jsonl(root / "gqa/llava_gqa_testdev_balanced.jsonl")
    _check_loader_rows(rows, root / "gqa/data/images", str)
    truth = json.loads((root / "gqa/data/testdev_balanced_questions.json").read_text())
    assert [r["question_id"] for r in rows] == list(truth)
    keys = {"question", "answer", "fullAnswer", "imageId", "isBalanced", "semantic", "semanticStr", "types",
            "groups", "entailed", "equivalent", "annotations"}
    for r in rows:
        t = truth[r["question_id"]]
        assert keys <= set(t)
        assert r["text"] == t["question"] + SHORT and r["category"] == "default"
        assert r["image"] == t["imageId"] + ".jpg"
        assert t["answer"] == t["answer"].lower() and t["isBalanced"] is True
    structural = {t["types"]["structural"] for t in truth.values()}
    assert "query" in structural and structural - {"query"}
    assert any(t["groups"]["global"] for t in truth.values())


def test_mme(root):
    base = root / "MME/MME_Benchmark_release_version"
    rows = read_jsonl(root / "MME/llava_mme.jsonl")
    _check_loader_rows(rows, base, str)
    assert {r["category"] for r in rows} == set(fixtures.MME_TASKS)
    assert len(fixtures.MME_TASKS) == 14
    for a, b in zip(rows[::2], rows[1::2]):  # two questions per image, adjacent
        assert a["question_id"] == b["question_id"] == a["image"]
    for r in rows:
        task, name = r["question_id"].split("/")[0], r["question_id"].split("/")[-1]
        assert task == r["category"]
        stem = name.rsplit(".", 1)[0]
        nested = task in fixtures.MME_NESTED
        gt = base / task / ("questions_answers_YN" if nested else "") / f"{stem}.txt"
        lines = gt.read_text(encoding="utf-8").splitlines()
        assert len(lines) == 2
        parsed = dict(line.split("\t") for line in lines)
        assert set(parsed.values()) == {"Yes", "No"}
        assert r["text"].endswith(SHORT)
        q = r["text"][: -len(SHORT)] + " Please answer yes or no."
        assert q in parsed
        if nested:
            assert r["image"] == f"{task}/images/{name}"


def test_pope(root):
    rows = read_jsonl(root / "pope/llava_pope_test.jsonl")
    _check_loader_rows(rows, root / "pope/val2014", int)
    assert sorted(p.name for p in (root / "pope/coco").iterdir()) == [
        "coco_pope_adversarial.json", "coco_pope_popular.json", "coco_pope_random.json"]
    assert [r["category"] for r in rows] == sorted(
        (r["category"] for r in rows), key=["adversarial", "random", "popular"].index)
    offsets = {"adversarial": 0, "random": 10_000_000, "popular": 20_000_000}
    for split, off in offsets.items():
        ann = read_jsonl(root / f"pope/coco/coco_pope_{split}.json")
        qs = [r for r in rows if r["category"] == split]
        assert {a["label"] for a in ann} == {"yes", "no"}
        assert len(ann) == len(qs)
        for a, q in zip(ann, qs):
            assert q["question_id"] == off + a["question_id"]
            assert q["text"] == a["text"] + SHORT and q["image"] == a["image"]
            assert a["image"].startswith("COCO_val2014_")


def test_textvqa(root):
    rows = read_jsonl(root / "textvqa/llava_textvqa_val_v051_ocr.jsonl")
    _check_loader_rows(rows, root / "textvqa/train_images", str)
    ann = json.loads((root / "textvqa/TextVQA_0.5.1_val.json").read_text())
    assert ann["dataset_version"] == "0.5.1" and ann["dataset_type"] == "val"
    by_key = {(d["image_id"], d["question"].lower()): d for d in ann["data"]}
    assert len(by_key) == len(rows)
    assert len({r["question_id"] for r in rows}) < len(rows)  # an image with two questions
    empty_ocr = 0
    for r in rows:
        lines = r["text"].split("\n")
        assert len(lines) == 3 and lines[1].startswith("Reference OCR token: ")
        empty_ocr += lines[1] == "Reference OCR token: "
        assert "\n" + lines[2] == SHORT
        d = by_key[(r["question_id"], lines[0].lower())]
        assert len(d["answers"]) == 10 and isinstance(d["question_id"], int)
        assert r["image"] == d["image_id"] + ".jpg"
    assert empty_ocr == 1


def test_vqav2(root):
    dev = read_jsonl(root / "vqav2/llava_vqav2_mscoco_test-dev2015.jsonl")
    full = read_jsonl(root / "vqav2/llava_vqav2_mscoco_test2015.jsonl")
    _check_loader_rows(dev, root / "vqav2/test2015", int)
    _check_loader_rows(full, root / "vqav2/test2015", int)
    dev_ids, full_ids = {r["question_id"] for r in dev}, {r["question_id"] for r in full}
    assert dev_ids < full_ids
    for r in full:
        assert r["image"] == f"COCO_test2015_{r['question_id'] // 1000:012d}.jpg"


def test_scienceqa(root):
    entries = json.loads((root / "scienceqa/llava_test_CQM-A.json").read_text())
    problems = json.loads((root / "scienceqa/problems.json").read_text())
    splits = json.loads((root / "scienceqa/pid_splits.json").read_text())
    assert isinstance(entries, list)
    assert {"train", "val", "test", "trainval", "minitrain", "minival", "minitest"} <= set(splits)
    assert [e["id"] for e in entries] == splits["test"]
    with_img = [e for e in entries if "image" in e]
    assert with_img and len(with_img) < len(entries)
    for e in entries:
        p = problems[e["id"]]
        human, gpt = e["conversations"][0]["value"], e["conversations"][1]["value"]
        assert e["conversations"][0]["from"] == "human" and e["conversations"][1]["from"] == "gpt"
        assert gpt == "ABCDE"[p["answer"]]
        assert human.startswith("<image>\n") == ("image" in e)
        assert human.endswith("\n".join(f"{'ABCDE'[i]}. {c}" for i, c in enumerate(p["choices"])))
        if "image" in e:
            assert e["image"] == f"{e['id']}/image.png" and p["image"] == "image.png"
            assert (root / "scienceqa/images/test" / e["image"]).is_file()
        else:
            assert p["image"] is None


@pytest.mark.parametrize("rel,lang", [("mmbench/mmbench_dev_20230712.tsv", "en"),
                                      ("mmbench_cn/mmbench_dev_cn_20231003.tsv", "cn")])
def test_mmbench(root, rel, lang):
    with open(root / rel, encoding="utf-8", newline="") as f:
        header = f.readline().rstrip("\n").split("\t")
    assert tuple(header) == fixtures.MMB_COLUMNS
    rows = read_tsv(root / rel)
    groups = defaultdict(list)
    for r in rows:
        groups[int(r["index"]) % 1_000_000].append(r)
        with Image.open(io.BytesIO(base64.b64decode(r["image"]))) as im:
            assert im.mode == "RGB"
        assert r["answer"] in "ABCD" and r[r["answer"]]
        assert r["split"] == "dev"
    assert len(groups) >= 2
    for variants in groups.values():
        n_opts = len([c for c in "ABCD" if variants[0][c]])
        assert len(variants) == n_opts >= 2
        assert sorted(int(v["index"]) // 1_000_000 for v in variants) == list(range(n_opts))
        assert len({v[v["answer"]] for v in variants}) == 1  # the right option text survives rotation
    if lang == "cn":
        assert any(ord(ch) > 0x4E00 for r in rows for ch in r["question"])


@pytest.mark.parametrize("rel", ["mmbench/mmbench_dev_20230712.tsv", "mmbench_cn/mmbench_dev_cn_20231003.tsv"])
def test_mmbench_reads_with_pandas(root, rel):
    pd = pytest.importorskip("pandas", reason="pandas is optional; upstream reads the TSV with pd.read_table")
    df = pd.read_table(root / rel)
    assert len(df) == len(read_tsv(root / rel)) and list(df.columns) == list(fixtures.MMB_COLUMNS)


def test_deterministic_for_a_seed(tmp_path):
    a = fixtures.write_fixtures(tmp_path / "a", seed=3, n_per_bench=3)
    b = fixtures.write_fixtures(tmp_path / "b", seed=3, n_per_bench=3)
    c = fixtures.write_fixtures(tmp_path / "c", seed=4, n_per_bench=3)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert (a / EXPECTED_FILES[0]).read_bytes() != (c / EXPECTED_FILES[0]).read_bytes()


def test_subset_does_not_change_other_benchmarks(tmp_path):
    full = fixtures.write_fixtures(tmp_path / "full", seed=1, n_per_bench=2)
    only = fixtures.write_fixtures(tmp_path / "only", seed=1, n_per_bench=2, benchmarks=["pope"])
    assert not (only / "gqa").exists()
    rel = "pope/llava_pope_test.jsonl"
    assert (full / rel).read_bytes() == (only / rel).read_bytes()


@pytest.mark.parametrize("n", [1, 2, 5])
def test_small_and_odd_counts(tmp_path, n):
    root = fixtures.write_fixtures(tmp_path, seed=0, n_per_bench=n)
    for rel in EXPECTED_FILES:
        assert (root / rel).is_file()
    assert len(read_jsonl(root / "gqa/llava_gqa_testdev_balanced.jsonl")) == max(2, n)


def test_cli_writes_and_refuses_to_overwrite(tmp_path):
    cmd = [sys.executable, "-m", "llava.eval.fixtures", "--out", str(tmp_path), "--n-per-bench", "2",
           "--benchmarks", "pope,gqa"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "pope/llava_pope_test.jsonl").is_file() and not (tmp_path / "MME").exists()
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode != 0 and "refusing to overwrite" in again.stderr
    assert subprocess.run(cmd + ["--force"], capture_output=True).returncode == 0
    bad = subprocess.run(cmd[:-1] + ["pope,nope"], capture_output=True, text=True)
    assert bad.returncode != 0 and "nope" in bad.stderr


# ------------------------------------------------------------------ the real scorers accept the fixtures

LLAVA_SQA_SUFFIX = "\nAnswer with the option's letter from the given choices directly."


def _answer(qid, prompt, text, **more) -> dict:
    return {"question_id": qid, "prompt": prompt, "text": text, "answer_id": "a", "model_id": "m",
            "metadata": {}, **more}


def _perfect_answers(root: Path, bench: str) -> list[dict]:
    """Answers a perfect model would write, built from each fixture's ground truth."""
    if bench == "gqa":
        truth = json.loads((root / "gqa/data/testdev_balanced_questions.json").read_text())
        return [_answer(r["question_id"], r["text"], truth[r["question_id"]]["answer"].capitalize() + ".")
                for r in read_jsonl(root / "gqa/llava_gqa_testdev_balanced.jsonl")]
    if bench == "mme":
        base, out = root / "MME/MME_Benchmark_release_version", []
        for r in read_jsonl(root / "MME/llava_mme.jsonl"):
            stem = r["image"].rsplit("/", 1)[-1].rsplit(".", 1)[0]
            gt = next(base.joinpath(r["category"]).rglob(f"{stem}.txt")).read_text(encoding="utf-8")
            labels = dict(line.split("\t") for line in gt.splitlines())
            out.append(_answer(r["question_id"], r["text"], labels[r["text"][: -len(SHORT)] + " Please answer yes or no."]))
        return out
    if bench == "pope":
        rows, out = read_jsonl(root / "pope/llava_pope_test.jsonl"), []
        for split in ("adversarial", "random", "popular"):
            ann = read_jsonl(root / f"pope/coco/coco_pope_{split}.json")
            qs = [r for r in rows if r["category"] == split]
            out += [_answer(q["question_id"], q["text"], a["label"].capitalize()) for a, q in zip(ann, qs)]
        return out
    if bench == "textvqa":
        ann = json.loads((root / "textvqa/TextVQA_0.5.1_val.json").read_text())["data"]
        by_key = {(d["image_id"], d["question"].lower()): d["answers"] for d in ann}
        out = []
        for r in read_jsonl(root / "textvqa/llava_textvqa_val_v051_ocr.jsonl"):
            answers = by_key[(r["question_id"], r["text"].split("\n")[0].lower())]
            out.append(_answer(r["question_id"], r["text"], max(set(answers), key=answers.count)))
        return out
    if bench == "sqa":
        out = []
        for e in json.loads((root / "scienceqa/llava_test_CQM-A.json").read_text()):
            q = e["conversations"][0]["value"].replace("<image>\n", "")
            prompt = ("<image>\n" if "image" in e else "") + q + LLAVA_SQA_SUFFIX
            out.append(_answer(e["id"], prompt, e["conversations"][1]["value"]))
        return out
    rel = {"mmbench": "mmbench/mmbench_dev_20230712.tsv", "mmbench_cn": "mmbench_cn/mmbench_dev_cn_20231003.tsv"}
    return [_answer(int(r["index"]), r["question"], r["answer"], round_id=0,
                    options=[r[c] for c in "ABCD" if r[c]], option_char=[c for c in "ABCD" if r[c]])
            for r in read_tsv(root / rel[bench])]


SCORER_ARGS = {
    "gqa": ("eval_gqa", ["--annotation-file", "gqa/data/testdev_balanced_questions.json"], 100.0),
    "mme": ("eval_mme", ["--gt-dir", "MME/MME_Benchmark_release_version"], 2800.0),
    "pope": ("eval_pope", ["--annotation-dir", "pope/coco", "--question-file", "pope/llava_pope_test.jsonl"], 100.0),
    "textvqa": ("eval_textvqa", ["--annotation-file", "textvqa/TextVQA_0.5.1_val.json"], 100.0),
    "sqa": ("eval_science_qa", ["--base-dir", "scienceqa"], 100.0),
    "mmbench": ("eval_mmbench", ["--annotation-file", "mmbench/mmbench_dev_20230712.tsv"], 100.0),
    "mmbench_cn": ("eval_mmbench", ["--annotation-file", "mmbench_cn/mmbench_dev_cn_20231003.tsv",
                                    "--lang", "cn"], 100.0),
}


@pytest.mark.parametrize("bench", sorted(SCORER_ARGS))
def test_real_scorer_gives_full_marks_to_ground_truth(root, tmp_path, bench):
    module, args, best = SCORER_ARGS[bench]
    scorer = pytest.importorskip(f"llava.eval.{module}", reason=f"llava.eval.{module} is not written yet")
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps(a, ensure_ascii=False) + "\n" for a in _perfect_answers(root, bench)),
                       encoding="utf-8")
    out = tmp_path / "result.json"
    argv = [str(root / a) if "/" in a or a == "scienceqa" else a for a in args]
    scorer.main(argv + ["--result-file", str(answers), "--result-json", str(out), "--model", "oracle"])
    res = json.loads(out.read_text())
    assert res["score"] == pytest.approx(best) and res["num_questions"] > 0


def test_real_vqav2_converter_pads_the_upload(root, tmp_path):
    scorer = pytest.importorskip("llava.eval.eval_vqav2", reason="llava.eval.eval_vqav2 is not written yet")
    dev = read_jsonl(root / "vqav2/llava_vqav2_mscoco_test-dev2015.jsonl")
    answers = tmp_path / "merge.jsonl"
    answers.write_text("".join(json.dumps(_answer(r["question_id"], r["text"], "Two.")) + "\n" for r in dev))
    upload = tmp_path / "upload.json"
    scorer.main(["--question-file", str(root / "vqav2/llava_vqav2_mscoco_test2015.jsonl"),
                 "--result-file", str(answers), "--submission-out", str(upload)])
    sub = {u["question_id"]: u["answer"] for u in json.loads(upload.read_text())}
    assert len(sub) == len(read_jsonl(root / "vqav2/llava_vqav2_mscoco_test2015.jsonl"))
    assert all(sub[r["question_id"]] == "2" for r in dev)
    assert sum(v == "" for v in sub.values()) == len(sub) - len(dev)
