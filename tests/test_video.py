"""Video input (``llava.video``), the Video-MME scorer and its miniature benchmark, on clips the tests write.

Frame ``k`` of every clip here is a flat grey of level ``10 + 15 k`` with a red top-left quarter, so a decoded
frame tells its own number (mpeg4 at qscale 1 keeps the level within a few units) and the channel order.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from llava.eval import eval_videomme as vm
from llava.eval import fixtures
from llava.model.tiny_qwen import preprocessor_config
from llava.video import (
    QWEN_MAX_PIXELS,
    QWEN_MIN_PIXELS,
    QWEN_TOTAL_PIXELS,
    VideoSampling,
    add_video_args,
    decode_frames,
    encode_video,
    load_video,
    probe_video,
    qwen_frame_size,
    qwen_num_frames,
    qwen_video_inputs,
    resize_frames,
    sample_frame_indices,
)

# name -> (frames, fps, (width, height), container)
CLIPS = {"c16": (16, 4, (64, 48), "mp4"), "c8": (8, 8, (96, 64), "mkv")}


def numbered_frames(n: int, size: tuple[int, int]) -> np.ndarray:
    w, h = size
    frames = np.stack([np.full((h, w, 3), 10 + 15 * k, np.uint8) for k in range(n)])
    frames[:, : h // 2, : w // 2] = (200, 0, 0)
    return frames


def frame_numbers(frames: np.ndarray) -> list[int]:
    """The number each decoded frame shows (its grey level, read away from the red quarter)."""
    h, w = frames.shape[1:3]
    return [round((float(f[h // 2:, w // 2:].mean()) - 10) / 15) for f in frames]


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("clips")
    return {name: Path(encode_video(root / f"{name}.{ext}", numbered_frames(n, size), fps=fps))
            for name, (n, fps, size, ext) in CLIPS.items()}


# ------------------------------------------------------------------------------------------------ decoding


@pytest.mark.parametrize("name", sorted(CLIPS))
def test_probe_reads_count_rate_and_size(clips, name):
    n, fps, (w, h), ext = CLIPS[name]
    info = probe_video(clips[name])  # mp4 records its frame count, mkv does not (counted by decoding)
    assert (info.total_frames, info.fps, info.width, info.height) == (n, fps, w, h)
    assert info.duration == pytest.approx(n / fps)


@pytest.mark.parametrize("name", sorted(CLIPS))
def test_decode_returns_the_asked_frames_in_rgb(clips, name):
    n = CLIPS[name][0]
    indices = [n - 1, 0, 3, 3, 5]  # any order, repeats allowed
    frames = decode_frames(clips[name], indices)
    w, h = CLIPS[name][2]
    assert frames.shape == (5, h, w, 3) and frames.dtype == np.uint8
    assert frame_numbers(frames) == indices
    red = frames[:, : h // 4, : w // 4].reshape(-1, 3).mean(0)
    assert red[0] > 180 and red[1] < 30 and red[2] < 30  # RGB order, not BGR


def test_a_container_count_too_high_is_corrected(clips, monkeypatch, caplog):
    import llava.video as video

    true = probe_video(clips["c16"])
    monkeypatch.setattr(video, "probe_video", lambda path: video.VideoInfo(**{**true.__dict__, "total_frames": 20}))
    got = video.load_video(clips["c16"])  # 20 frames at 4 fps would take 10; the stream has 16: 8 as usual
    assert got.indices == [0, 2, 4, 6, 9, 11, 13, 15] and got.info.total_frames == 16
    assert frame_numbers(got.frames) == got.indices
    assert "the container says 20 frames but 16 decode" in caplog.text
    with pytest.raises(ValueError, match="frame 16 asked, but the stream has 16 frames"):
        decode_frames(clips["c16"], [0, 16])


def test_decode_errors_are_one_line(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="video file not found: .*nope.mp4"):
        probe_video(tmp_path / "nope.mp4")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"this is not a video" * 50)
    with pytest.raises(ValueError, match="cannot decode video .*junk.mp4"):
        load_video(junk)
    monkeypatch.setitem(sys.modules, "av", None)  # PyAV not installed
    with pytest.raises(ImportError, match=r"needs PyAV: pip install -e '\.\[video\]'"):
        probe_video(junk)


def test_encode_refuses_odd_sizes(tmp_path):
    with pytest.raises(ValueError, match="must be even"):
        encode_video(tmp_path / "x.mp4", np.zeros((2, 47, 64, 3), np.uint8))


# ------------------------------------------------------------------------------------------------ sampling rules


def qwen_rule(total: int, video_fps: float, num_frames=None, fps=None, min_frames=4, max_frames=768):
    """qwen-vl-utils 0.0.10's frame count and indices, in exact arithmetic (half to even, as torch.round)."""
    if num_frames is not None:
        n = 2 * round(Fraction(num_frames, 2))
    else:
        fps = 2.0 if fps is None else fps
        lo, hi = 2 * math.ceil(min_frames / 2), 2 * (min(max_frames, total) // 2)
        n = 2 * math.floor(min(max(Fraction(total) / Fraction(video_fps) * Fraction(fps), lo), hi, total) / 2)
    return n, [round(Fraction((total - 1) * k, n - 1)) for k in range(n)]


QWEN_CASES = [  # (total frames, video fps, options, n, indices worked by hand where short)
    (16, 4, {}, 8, [0, 2, 4, 6, 9, 11, 13, 15]),  # 4 s at 2 fps
    (8, 8, {}, 4, [0, 2, 5, 7]),  # 1 s -> 2 frames, raised to min_frames 4
    (16, 4, {"num_frames": 5}, 4, [0, 5, 10, 15]),  # round(5 / 2) = 2 (half to even) -> 4
    (16, 4, {"num_frames": 7}, 8, None),  # round(3.5) = 4 -> 8
    (16, 4, {"fps": 1.0}, 4, None),
    (30 * 600, 30, {}, 768, None),  # 10 min at 2 fps = 1200, capped at max_frames
    (30 * 33 + 7, 30, {}, 66, None),  # 33.2 s -> 66.47 -> 66
    (25 * 61, 25, {"fps": 0.5, "max_frames": 16}, 16, None),
    (5, 30, {}, 4, [0, 1, 3, 4]),  # short clip: min_frames 4 <= its 5 frames
]


@pytest.mark.parametrize("total,video_fps,options,n,indices", QWEN_CASES)
def test_qwen_rule_matches_the_authors_formula(total, video_fps, options, n, indices):
    sampling = VideoSampling(**options)
    want_n, want_idx = qwen_rule(total, video_fps, **options)
    assert qwen_num_frames(total, video_fps, sampling) == want_n == n
    got = sample_frame_indices(total, video_fps, sampling)
    assert got == want_idx
    if indices is not None:
        assert got == indices


@pytest.mark.parametrize("total,n,indices", [
    (16, None, list(range(16))),  # default 32 frames, never more than the video has
    (100, 8, [0, 14, 28, 42, 56, 70, 84, 99]),  # truncated (rounding would give 57, 71, 85)
    (1000, 32, [int(999 * k / 31) for k in range(32)]),
])
def test_uniform_rule_is_truncated_linspace(total, n, indices):
    assert sample_frame_indices(total, 30.0, VideoSampling(rule="uniform", num_frames=n)) == indices


def test_sampling_refuses_what_the_rule_cannot_do():
    with pytest.raises(ValueError, match="not both"):
        VideoSampling(num_frames=8, fps=2.0)
    with pytest.raises(ValueError, match="fps belong to the smart rule"):
        VideoSampling(rule="uniform", fps=1.0)
    with pytest.raises(ValueError, match="unknown video sampling rule"):
        VideoSampling(rule="nope")
    with pytest.raises(ValueError, match="positive integer"):
        VideoSampling(num_frames=0)
    with pytest.raises(ValueError, match="between 2 and the video's 16 frames"):
        sample_frame_indices(16, 4.0, VideoSampling(num_frames=18))


@pytest.mark.parametrize("hw,n,options,size", [
    ((48, 64), 8, {}, (280, 392)),  # raised to min_pixels 128*28*28: beta = sqrt(100352 / 3072)
    ((1080, 1920), 32, {}, (560, 1008)),  # per-frame cap 768*28*28
    ((1080, 1920), 768, {}, (336, 644)),  # total budget: 90316800 / 768 * 2 = 235200 per frame
    ((1080, 1920), 32, {"max_pixels": 200_000}, (308, 588)),
    ((48, 64), 4, {"min_pixels": 28 * 28}, (56, 56)),
])
def test_qwen_frame_size(hw, n, options, size):
    assert qwen_frame_size(*hw, n, VideoSampling(**options)) == size
    h, w = size
    assert h % 28 == 0 and w % 28 == 0


def test_resize_keeps_flat_frames_flat():
    frames = np.full((3, 48, 64, 3), 77, np.uint8)
    out = resize_frames(frames, (56, 84))
    assert out.shape == (3, 56, 84, 3) and out.dtype == np.uint8 and (out == 77).all()
    assert resize_frames(frames, (48, 64)) is frames


def test_sampling_options_are_recorded_resolved():
    assert VideoSampling().record() == {
        "rule": "smart", "num_frames": None, "fps": 2.0, "min_frames": 4, "max_frames": 768,
        "min_pixels": QWEN_MIN_PIXELS, "max_pixels": None, "total_pixels": QWEN_TOTAL_PIXELS}
    assert VideoSampling(rule="uniform").record()["num_frames"] == 32
    parser = argparse.ArgumentParser()
    add_video_args(parser)
    args = parser.parse_args(["--num-frames", "16", "--video-max-pixels", "50000"])
    assert VideoSampling.from_args(args, "smart") == VideoSampling(num_frames=16, max_pixels=50000)
    assert QWEN_MAX_PIXELS == 602112  # 768 * 28 * 28, the per-frame cap the help text names


def test_load_video_qwen_and_uniform(clips):
    video = load_video(clips["c16"])  # 16 frames at 4 fps -> 8 frames, each raised to 280 x 392
    assert video.indices == [0, 2, 4, 6, 9, 11, 13, 15]
    assert video.frames.shape == (8, 280, 392, 3)
    assert frame_numbers(video.frames) == video.indices
    assert video.sample_fps == pytest.approx(2.0)
    uniform = load_video(clips["c8"], VideoSampling(rule="uniform", num_frames=4))
    assert uniform.indices == [0, 2, 4, 7] and uniform.frames.shape == (4, 64, 96, 3)
    assert frame_numbers(uniform.frames) == uniform.indices


# ------------------------------------------------------------------------------------------------ Qwen inputs


@pytest.mark.parametrize("name,options,keep", [
    ("c16", {}, None),
    ("c8", {"min_pixels": 28 * 28}, None),
    ("c16", {"num_frames": 6, "min_pixels": 28 * 28}, 3),  # an odd count: the last frame is repeated
])
def test_qwen_inputs_equal_the_slow_image_processor(clips, name, options, keep):
    from transformers import Qwen2VLImageProcessor

    video = load_video(clips[name], VideoSampling(**options))
    frames = video.frames[:keep]
    ours = qwen_video_inputs(frames, Qwen2VLImageProcessor(**preprocessor_config()), video.sample_fps)
    # transformers' own video path, resizing with its smart_resize between bounds that hold the frame size
    area = frames.shape[1] * frames.shape[2]
    reference = Qwen2VLImageProcessor(**preprocessor_config(min_pixels=min(area, QWEN_MIN_PIXELS), max_pixels=area))
    ref = reference(images=None, videos=[frames], return_tensors="pt")
    assert torch.equal(ours["pixel_values_videos"], ref["pixel_values_videos"])
    assert torch.equal(ours["video_grid_thw"], ref["video_grid_thw"])
    t, h, w = ours["video_grid_thw"][0].tolist()
    assert (t, h, w) == (math.ceil(len(frames) / 2), frames.shape[1] // 14, frames.shape[2] // 14)
    assert ours["pixel_values_videos"].shape == (t * h * w, 3 * 2 * 14 * 14)
    assert ours["second_per_grid_ts"].tolist() == pytest.approx([2 / video.sample_fps])


@pytest.mark.parametrize("t,h,w", [(5, 56, 84), (2, 112, 56)])
def test_qwen_inputs_equal_the_slow_image_processor_on_noise(t, h, w):
    """Random pixels: every patch differs, so any misplaced value shows."""
    from transformers import Qwen2VLImageProcessor

    frames = np.random.default_rng(t * h + w).integers(0, 256, (t, h, w, 3), dtype=np.uint8)
    processor = Qwen2VLImageProcessor(**preprocessor_config(min_pixels=h * w, max_pixels=h * w))
    ours = qwen_video_inputs(frames, processor, 2.0)
    ref = processor(images=None, videos=[frames], return_tensors="pt")
    assert torch.equal(ours["pixel_values_videos"], ref["pixel_values_videos"])
    assert torch.equal(ours["video_grid_thw"], ref["video_grid_thw"])


def test_qwen_inputs_refuse_unaligned_frames():
    from transformers import Qwen2VLImageProcessor

    with pytest.raises(ValueError, match="not a multiple of 28"):
        qwen_video_inputs(np.zeros((2, 48, 64, 3), np.uint8), Qwen2VLImageProcessor(), 2.0)


# ------------------------------------------------------------------------------------------------ Video-MME scorer


@pytest.mark.parametrize("text,letter", [
    ("C", "C"),
    ("The best answer is B.", "B"),
    ("The correct answer is (D) because ...", "D"),
    ("  a. no capital letter here  ", None),
    ("", None),
    ("Best answer: C", "B"),  # the official prefix list joins "Best answer:" with the next entry
    ("Answer: D", "A"),  # the first capital A-D counts, wherever it is
])
def test_official_letter_rule(text, letter):
    assert vm.extract_letter(text) == letter


def _official(videos: list[tuple[str, str, list[tuple[str, str]]]]) -> list[dict]:
    """Official-layout annotation: (video id, duration, [(task type, answer), ...]) per video."""
    return [{"video_id": vid, "duration_category": dur, "video_category": "Knowledge",
             "video_subcategory": "Astronomy", "url": f"https://www.youtube.com/watch?v=yt{vid}",
             "questions": [{"question_id": f"{vid}-{j}", "task_type": task, "question": f"Q{j}?",
                            "choices": ["A. a.", "B. b.", "C. c.", "D. d."], "answer": answer}
                           for j, (task, answer) in enumerate(qs, start=1)]}
            for vid, dur, qs in videos]


ANNOTATION = _official([
    ("001", "short", [("Counting Problem", "A"), ("OCR Problems", "B")]),
    ("301", "medium", [("Counting Problem", "C"), ("OCR Problems", "D")]),
    ("601", "long", [("Counting Problem", "A"), ("OCR Problems", "A")]),
])
ANSWERS = {
    "001-1": "A", "001-2": "The best answer is B",  # right
    "301-1": "D", "301-2": "I cannot tell",  # wrong, unparsed
    "601-1": "A.",  # right; 601-2 unanswered
}


def test_scorer_on_hand_made_answers(tmp_path):
    ann = tmp_path / "videomme.json"
    ann.write_text(json.dumps(ANNOTATION))
    res = vm.score_videomme(vm.read_annotation(str(ann)), {k: {"text": v} for k, v in ANSWERS.items()})
    assert res["overall"]["accuracy"] == pytest.approx(100 * 3 / 6)
    assert res["overall"]["accuracy_parsed_only"] == pytest.approx(100 * 3 / 4)  # the official denominator
    assert (res["num_missing"], res["num_unparsed"]) == (1, 1)
    assert {k: v["accuracy"] for k, v in res["groups"]["duration"].items()} == {"short": 100.0, "medium": 0.0,
                                                                                 "long": 50.0}
    assert res["groups"]["task_type"]["Counting Problem"]["accuracy"] == pytest.approx(200 / 3)
    assert res["groups"]["task_type"]["OCR Problems"]["accuracy"] == pytest.approx(100 / 3)
    only_short = vm.score_videomme(vm.read_annotation(str(ann)), {k: {"text": v} for k, v in ANSWERS.items()},
                                   durations=["short"])
    assert only_short["num_questions"] == 2 and only_short["overall"]["accuracy"] == 100.0


def test_scorer_reads_both_layouts_alike(tmp_path):
    official = tmp_path / "videomme.json"
    official.write_text(json.dumps(ANNOTATION))
    rows = [{"video_id": v["video_id"], "duration": v["duration_category"], "domain": v["video_category"],
             "sub_category": v["video_subcategory"], "url": v["url"], "videoID": f"yt{v['video_id']}",
             "question_id": q["question_id"], "task_type": q["task_type"], "question": q["question"],
             "options": q["choices"], "answer": q["answer"]} for v in ANNOTATION for q in v["questions"]]
    flat = tmp_path / "test.jsonl"
    flat.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines_named_json = tmp_path / "test.json"  # what datasets' to_json writes
    lines_named_json.write_text(flat.read_text())
    a, b = vm.read_annotation(str(official)), vm.read_annotation(str(flat))
    assert a == b == vm.read_annotation(str(lines_named_json))
    assert len(a) == 6 and a[0].youtube_id == "yt001" and a[0].sub_category == "Astronomy"
    assert vm.question_rows(a)[0]["video"] == "data/yt001.mp4"


@pytest.mark.parametrize("change,message", [
    (lambda a: a[0].update(duration_category="tiny"), "duration 'tiny' is not one of short, medium, long"),
    (lambda a: a[0]["questions"][0].update(answer="E"), "answer 'E' is not one of A, B, C, D"),
    (lambda a: a[1]["questions"][0].update(question_id="001-1"), "question_id '001-1' appears more than once"),
    (lambda a: a[0]["questions"][0].pop("task_type"), "lacks task_type"),
])
def test_annotation_errors_are_one_line(tmp_path, change, message):
    bad = json.loads(json.dumps(ANNOTATION))
    change(bad)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=message):
        vm.read_annotation(str(path))
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    with pytest.raises(ValueError, match="parquet is not read here"):
        vm.read_annotation(str(tmp_path / "x.parquet"))


# ------------------------------------------------------------------------------------------------ fixture round trip


@pytest.fixture(scope="module")
def vmme(tmp_path_factory) -> Path:
    return fixtures.write_fixtures(tmp_path_factory.mktemp("fx"), seed=0, n_per_bench=4, benchmarks=["videomme"])


def test_fixture_files_decode_and_describe_their_clips(vmme):
    questions = vm.read_annotation(str(vmme / "videomme/videomme.json"))
    assert [q.duration for q in questions] == ["short"] * 2 + ["medium"] * 2 + ["long"] * 2
    rows = [json.loads(line) for line in (vmme / "videomme/llava_videomme.jsonl").read_text().splitlines()]
    assert rows == vm.question_rows(questions)
    for (duration, n_frames, fps, (w, h)), q in zip(fixtures.VMME_CLIPS, questions[::2]):
        lo, hi = fixtures.VMME_ID_RANGES[duration]
        assert lo <= int(q.video_id) <= hi
        info = probe_video(vmme / "videomme" / f"data/{q.youtube_id}.mp4")
        assert (info.total_frames, info.fps, info.width, info.height) == (n_frames, fps, w, h)
        # the colour question's answer is the colour drawn: pixels of it in the first frame, none of the others
        assert q.task_type == "Attribute Perception"
        colours = [o[3:-1] for o in q.options]
        first = decode_frames(info.path, [0])[0].reshape(-1, 1, 3).astype(int)
        near = [(np.abs(first - fixtures.COLOURS[c]).max(-1) < 40).sum() for c in colours]
        right = "ABCD".index(q.answer)
        assert near[right] > 0 and all(near[k] == 0 for k in range(4) if k != right)


def test_fixture_round_trip_through_the_scorer(vmme, tmp_path):
    questions = vm.read_annotation(str(vmme / "videomme/videomme.json"))
    answers = tmp_path / "videomme" / "answers" / "oracle.jsonl"
    answers.parent.mkdir(parents=True)
    answers.write_text("".join(json.dumps({"question_id": q.question_id, "text": q.answer}) + "\n"
                               for q in questions[:-1]))  # one question left unanswered
    out = tmp_path / "videomme" / "results" / "oracle.json"
    vm.main(["--annotation-file", str(vmme / "videomme/videomme.json"), "--result-file", str(answers),
             "--result-json", str(out)])
    res = json.loads(out.read_text())
    assert res["benchmark"] == "videomme" and res["model"] == "oracle"
    assert res["score"] == pytest.approx(100 * 5 / 6)
    assert {k: res["coverage"][k] for k in ("answered", "expected", "logged", "partial")} == {
        "answered": 5, "expected": 6, "logged": None, "partial": True}
    from llava.eval.results import read_results
    from llava.eval.summarize import build_accuracy_table, column_label

    rows = build_accuracy_table(read_results(str(tmp_path)), baseline=None)
    assert column_label("videomme") == "Video-MME" and rows[0].scores == {"videomme": pytest.approx(100 * 5 / 6)}
    assert rows[0].partial == {"videomme"}


def test_fixture_is_deterministic(vmme, tmp_path):
    again = fixtures.write_fixtures(tmp_path, seed=0, n_per_bench=4, benchmarks=["videomme"])
    files = sorted(p.relative_to(vmme) for p in (vmme / "videomme").rglob("*") if p.is_file())
    assert len(files) == 5
    assert all((vmme / f).read_bytes() == (again / f).read_bytes() for f in files)
