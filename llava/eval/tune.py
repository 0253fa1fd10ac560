"""Schedule optimiser: the stage layers and per-stage counts of any in-LLM method, for one average budget.

    python -m llava.eval.tune --model-path liuhaotian/llava-v1.5-7b --method pio --budget 64 \\
        --question-file calib.jsonl --image-folder images/ --out pio64.schedule.json [--trials 60] \\
        [--strategy coordinate|random|vflowopt] [--objective kl|cosine] [--holdout 0.25] [--time-limit 3600]

Every method answers the same question by hand today: after which layers to prune, and to how many tokens,
for a given average budget. This searches it. A candidate is a set of stage layers and a *shape* (how the count
falls from stage to stage); the budget solver (:mod:`pio.budget`) scales the shape to the budget, so every
candidate meets it as every ``--budget`` run does (an exact average whenever integer counts allow one; a
one-stage method to within half its last segment). The objective is the pruned model's divergence from the
unpruned model on the calibration questions: the mean KL(unpruned || pruned) of the next-token distribution at
the answer position (first answer token), ties broken by the agreement of that token's argmax; or
(``--objective cosine``) VFlowOpt's, the mean cosine similarity of the final (normed) hidden state there.

Strategies, each starting from the method's default schedule: ``coordinate`` (coordinate descent: each stage's
layer moved by 1 or 3, each stage's count scaled by 1.25 up or down, first improvement taken, until no move
improves or the limit is reached), ``random`` (seeded random layers and shapes) and ``vflowopt`` (VFlowOpt's
search, arXiv 2508.05211, official ``llava_ov_opt_all.py``: the stage layers fixed, per-stage keep ratios -- each
stage's share of the previous one -- found by Bayesian optimisation, random initial points then the expected
improvement of a Gaussian process; theirs is scikit-optimize's with fitted kernel hyper-parameters, 27 initial
points of 300 calls, ours a Matern-5/2 process with a fixed length scale written here, a tenth of the trials
random; they meet the budget by deriving the last stage's ratio, we by the solver's one scale factor).

Honest reporting: the calibration questions are split (seeded) into a search part and a held-out part. The
held-out part chooses between the best schedule found and the default (the found one is kept only when its
held-out divergence is no worse), and the report gives both schedules' held-out divergence and the agreement of
their greedy answers with the unpruned model's. With one choice between two schedules made on the held-out part,
the chosen schedule's held-out figure is optimistic by at most that choice.

Resumable: every evaluated candidate is written at once to the state file (``--state``, default ``OUT.state``);
a rerun with the same settings replays the search from it and continues, so a killed search resumed with the
same ``--trials`` and ``--seed`` ends with the same schedule as an uninterrupted one (``--time-limit`` stops on
the clock, which no replay can reproduce). The state records the checkpoint's content fingerprint
(:mod:`llava.eval.fingerprint`, as a run's identity does): a state saved for other weights, or one that is not a
state, is refused before the model loads. One search at a time writes a schedule file and its state (their locks,
:mod:`llava.eval.outputlock`). The schedule file (``--out``) is what runners take as ``--schedule-file`` and the
scripts as ``SCHEDULE=``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from pio.cli import SCHEDULE_FORMAT

logger = logging.getLogger(__name__)

N0 = 576  # the paper's visual count: candidates are stated at LLaVA-1.5's 576 tokens, solved per image
STRATEGIES = ("coordinate", "random", "vflowopt")


# --------------------------------------------------------------------------- candidates
@dataclass(frozen=True)
class Candidate:
    """Stage ``layers`` and the ``counts`` they keep out of :data:`N0` (already meeting the budget)."""

    layers: tuple[int, ...]
    counts: tuple[int, ...]

    @property
    def key(self) -> str:
        return ",".join(map(str, self.layers)) + ":" + ",".join(map(str, self.counts))


def tuned_schedule(c: Candidate, budget: float, num_layers: int, source: str = "llava.eval.tune"):
    """The :class:`pio.schedule.Schedule` of a candidate: the budget as a share of each image's tokens, solved
    with the candidate's counts as its shape (so 576 visual tokens give exactly those counts)."""
    from pio.budget import Anchors
    from pio.schedule import Schedule

    anchors = Anchors(c.layers, num_layers, N0, ((int(budget), c.counts),), source=source)
    return Schedule(c.layers, budget_ratio=budget / N0, anchors=anchors)


def solve(layers: Sequence[int], shape: Sequence[float], budget: float, num_layers: int) -> Candidate | None:
    """The candidate with ``layers`` whose counts keep ``shape`` (non-increasing, > 0) and meet ``budget``
    (None: the budget cannot be met with these layers, or only approximately when several stages could meet
    it exactly)."""
    from pio.schedule import average_visual_tokens

    layers = tuple(int(x) for x in layers)
    if any(b <= a for a, b in zip(layers, layers[1:])) or layers[0] < 1 or layers[-1] >= num_layers:
        return None
    shape_counts = [max(1, min(N0, int(round(s)))) for s in shape]
    for j in range(1, len(shape_counts)):
        shape_counts[j] = min(shape_counts[j], shape_counts[j - 1])
    try:  # the shape as the schedule's anchors, solved to the budget for a 576-token image
        counts = tuple(tuned_schedule(Candidate(layers, tuple(shape_counts)), budget, num_layers).counts(N0, num_layers))
    except ValueError:
        return None
    error = abs(average_visual_tokens(N0, layers, counts, num_layers) - budget) * num_layers  # token-layers
    if len(layers) > 1 and error > 0.5:
        return None  # several stages can meet an integer budget exactly; do not accept less
    return Candidate(layers, counts)


def neighbours(c: Candidate, budget: float, num_layers: int) -> list[Candidate]:
    """Coordinate moves: each stage's layer by -1, +1, -3, +3, then each stage's count scaled by 1.25 or 0.8."""
    out = []
    for j in range(len(c.layers)):
        for d in (-1, 1, -3, 3):
            layers = list(c.layers)
            layers[j] += d
            out.append(solve(layers, c.counts, budget, num_layers))
    if len(c.layers) > 1:
        for j in range(len(c.layers)):
            for f in (1.25, 0.8):
                shape = [float(x) for x in c.counts]
                shape[j] *= f
                lo = shape[j + 1] if j + 1 < len(shape) else 1.0
                hi = shape[j - 1] if j > 0 else float(N0)
                shape[j] = min(hi, max(lo, shape[j]))
                out.append(solve(c.layers, shape, budget, num_layers))
    seen, unique = {c.key}, []
    for n in out:
        if n is not None and n.key not in seen:
            seen.add(n.key)
            unique.append(n)
    return unique


def random_candidate(rng: random.Random, stages: int, budget: float, num_layers: int) -> Candidate | None:
    layers = sorted(rng.sample(range(1, num_layers), stages))
    shape = sorted((rng.uniform(0.05, 1.0) * N0 for _ in range(stages)), reverse=True)
    return solve(layers, shape, budget, num_layers)


# --------------------------------------------------------------------------- the objective
OBJECTIVES = ("kl", "cosine")


@dataclass
class Divergence:
    kl: float  # mean KL(unpruned || pruned) at the first answer token, nats
    first_token_same: float  # % of questions whose first answer token is the unpruned model's argmax
    cosine: float  # mean cosine similarity of the final hidden state at the answer position (VFlowOpt's signal)

    def loss(self, objective: str) -> float:
        """What the search minimises: the KL, or VFlowOpt's negated cosine similarity."""
        return self.kl if objective == "kl" else -self.cosine

    def better_than(self, other: Divergence, objective: str = "kl") -> bool:
        a, b = self.loss(objective), other.loss(objective)
        if not math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12):
            return a < b
        return self.first_token_same > other.first_token_same


class Evaluator:
    """The calibration questions, prepared once, with the unpruned model's first-token distributions."""

    def __init__(self, model, prepared: list[tuple[Any, Any, Any]]):
        self.model, self.prepared = model, prepared
        self.reference = [self._outputs(p, None) for p in prepared]

    def _outputs(self, prepared, method) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probabilities of the next token and the final (normed) hidden state at the last position: the
        LM head's input, read by a hook so that every model family answers the same way."""
        from pio import PruneState

        ids, pixels, sizes = prepared
        kw: dict[str, Any] = {"images": pixels, "image_sizes": sizes} if pixels is not None else {}
        if method is not None:
            kw.update(reducer=method, prune_state=PruneState())
        seen: list[torch.Tensor] = []
        hook = self.model.get_output_embeddings().register_forward_hook(
            lambda module, args, out: seen.append(args[0][0, -1].double()))
        try:
            with torch.inference_mode():
                logits = self.model(ids.to(self.model.device), **kw).logits[0, -1]
        finally:
            hook.remove()
        return torch.log_softmax(logits.double(), -1), seen[-1]

    def divergence(self, method, which: Sequence[int]) -> Divergence:
        kls, cos, same = [], [], 0
        for i in which:
            (p, h), (q, g) = self.reference[i], self._outputs(self.prepared[i], method)
            kls.append(float((p.exp() * (p - q)).sum()))
            cos.append(float(torch.nn.functional.cosine_similarity(h, g, dim=0)))
            same += int(p.argmax() == q.argmax())
        return Divergence(sum(kls) / len(kls), 100.0 * same / len(kls), sum(cos) / len(cos))


# --------------------------------------------------------------------------- state
class SearchState:
    """Evaluated candidates, written at once (atomically) to ``path``; a state of other settings is refused."""

    def __init__(self, path: str, config: dict[str, Any]):
        from llava.eval.runfiles import identity_differences

        self.path, self.config = path, config
        self.evaluated: dict[str, list[float]] = {}
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    data = json.load(f)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"--state {path}: not a search state of python -m llava.eval.tune (not JSON: {e}); "
                                 "delete it to start the search again, or give --state another file") from None
            if not isinstance(data, dict) or not isinstance(data.get("evaluated", {}), dict):
                raise ValueError(f"--state {path}: not a search state of python -m llava.eval.tune (a JSON object "
                                 "with config and evaluated); delete it or give --state another file")
            diff = identity_differences(data.get("config", {}), config)
            if diff:
                raise ValueError(f"{path} holds a search with other settings ({'; '.join(diff[:6])}); delete it or "
                                 "give --state another file")
            self.evaluated = data.get("evaluated", {})
            logger.info("resuming the search: %d candidates already evaluated (%s)", len(self.evaluated), path)

    def get(self, key: str) -> Divergence | None:
        v = self.evaluated.get(key)
        return Divergence(*v) if v is not None else None

    def put(self, key: str, d: Divergence) -> None:
        self.evaluated[key] = [d.kl, d.first_token_same, d.cosine]
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"config": self.config, "evaluated": self.evaluated}, f)
        os.replace(tmp, self.path)


# --------------------------------------------------------------------------- search
@dataclass
class SearchResult:
    default: Candidate
    best: Candidate
    trials: int
    scores: dict[str, Divergence]


def _shape(u: Sequence[float]) -> list[float]:
    """Stage counts out of :data:`N0` from per-stage keep ratios ``u`` in [0, 1] (each of the previous stage's,
    the first of :data:`N0`, between 5 % and 100 %): VFlowOpt's parametrisation."""
    out, prev = [], float(N0)
    for x in u:
        prev *= 0.05 + 0.95 * float(x)
        out.append(prev)
    return out


def _expected_improvement(x: torch.Tensor, y: torch.Tensor, pool: torch.Tensor, length: float = 0.3) -> torch.Tensor:
    """Expected improvement (minimisation) at ``pool`` (P, d) of a Gaussian process fitted to ``x`` (n, d), ``y``
    (n,): a Matern-5/2 kernel of fixed length scale on [0, 1]^d, outputs standardised, a small noise term."""
    def kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        r = torch.cdist(a, b) / length
        return (1 + math.sqrt(5) * r + 5 / 3 * r**2) * torch.exp(-math.sqrt(5) * r)

    mu, sd = y.mean(), y.std().clamp_min(1e-12) if len(y) > 1 else torch.tensor(1.0, dtype=y.dtype)
    z = (y - mu) / sd
    chol = torch.linalg.cholesky(kernel(x, x) + 1e-6 * torch.eye(len(x), dtype=x.dtype))
    k = kernel(x, pool)  # (n, P)
    alpha = torch.cholesky_solve(z[:, None], chol)
    mean = (k * alpha).sum(0)
    v = torch.cholesky_solve(k, chol)
    std = (1 - (k * v).sum(0)).clamp_min(1e-12).sqrt()
    gap = z.min() - mean
    t = gap / std
    normal = torch.distributions.Normal(torch.zeros((), dtype=x.dtype), torch.ones((), dtype=x.dtype))
    return gap * normal.cdf(t) + std * normal.log_prob(t).exp()


def search(default: Candidate, evaluate: Callable[[Candidate], Divergence], strategy: str, trials: int,
           budget: float, num_layers: int, seed: int, deadline: float | None = None,
           progress: Any = None, objective: str = "kl") -> SearchResult:
    """Run ``strategy`` from ``default`` for at most ``trials`` evaluations (the default's included)."""
    scores: dict[str, Divergence] = {}

    def score(c: Candidate) -> Divergence | None:
        if c.key in scores:
            return scores[c.key]
        if len(scores) >= trials or (deadline is not None and time.monotonic() > deadline):
            return None
        scores[c.key] = evaluate(c)
        if progress is not None:
            progress.update(1)
        return scores[c.key]

    best = default
    best_score = score(default)

    def consider(c: Candidate, s: Divergence) -> None:
        nonlocal best, best_score
        if s.better_than(best_score, objective):
            best, best_score = c, s

    if strategy == "coordinate":
        improved = True
        while improved:
            improved = False
            for n in neighbours(best, budget, num_layers):
                s = score(n)
                if s is None:
                    break
                if s.better_than(best_score, objective):
                    best, best_score, improved = n, s, True
                    break
    elif strategy == "random":
        rng = random.Random(seed)
        misses = 0
        while misses < 1000:
            c = random_candidate(rng, len(default.layers), budget, num_layers)
            if c is None or c.key in scores:
                misses += 1
                continue
            s = score(c)
            if s is None:
                break
            consider(c, s)
    elif strategy == "vflowopt":
        # VFlowOpt's search: the stage layers fixed, per-stage keep ratios searched by Bayesian optimisation
        # (random initial points, then expected improvement of a Gaussian process), the budget met by the solver
        gen = torch.Generator().manual_seed(seed)
        dims = len(default.layers)
        xs: list[torch.Tensor] = []
        ys: list[float] = []
        initial = max(3, trials // 10)
        misses = 0
        while len(scores) < trials and misses < 200:
            if len(xs) < initial:
                u = torch.rand(dims, generator=gen, dtype=torch.float64)
            else:
                pool = torch.rand(2048, dims, generator=gen, dtype=torch.float64)
                ei = _expected_improvement(torch.stack(xs), torch.tensor(ys, dtype=torch.float64), pool)
                u = pool[int(ei.argmax())]
            c = solve(default.layers, _shape(u.tolist()), budget, num_layers)
            if c is None or c.key in scores:
                misses += 1
                if c is not None:  # a shape the solver maps onto a known candidate: the GP learns it too
                    xs.append(u)
                    ys.append(scores[c.key].loss(objective))
                continue
            s = score(c)
            if s is None:
                break
            xs.append(u)
            ys.append(s.loss(objective))
            consider(c, s)
    else:
        raise ValueError(f"unknown --strategy {strategy!r}; allowed: {', '.join(STRATEGIES)}")
    return SearchResult(default, best, len(scores), scores)


# --------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    from llava.eval import runner

    p = argparse.ArgumentParser(description="Search the stage layers and counts of a method for one budget.")
    p.add_argument("--question-file", "--calib", dest="question_file", required=True,
                   help="calibration questions (model_vqa_loader format: question_id, image, text per line)")
    p.add_argument("--image-folder", default="")
    p.add_argument("--out", required=True, help="the schedule file to write (JSON; runners take --schedule-file)")
    p.add_argument("--state", default=None, help="search state for resuming (default: OUT.state)")
    p.add_argument("--strategy", default="coordinate", choices=STRATEGIES,
                   help="coordinate descent from the default, seeded random search, or VFlowOpt's Bayesian "
                        "optimisation of the per-stage ratios at fixed layers")
    p.add_argument("--objective", default="kl", choices=OBJECTIVES,
                   help="minimise the first answer token's KL from the unpruned model (default), or maximise the "
                        "cosine similarity of the final hidden state there (VFlowOpt's)")
    p.add_argument("--trials", type=int, default=60, help="most candidates evaluated (the default's included)")
    p.add_argument("--time-limit", type=float, default=None, help="stop the search after this many seconds")
    p.add_argument("--holdout", type=float, default=0.25,
                   help="share of the calibration questions held out to choose and report (default 0.25)")
    p.add_argument("--answer-tokens", type=int, default=16,
                   help="greedy answer length for the held-out answer agreement (default 16)")
    runner.add_common_args(p, max_new_tokens=16)
    return p


def _split(n: int, holdout: float, seed: int) -> tuple[list[int], list[int]]:
    if not 0 < holdout < 1:
        raise ValueError(f"--holdout must be in (0, 1), got {holdout}")
    if n < 2:
        raise ValueError(f"the calibration file has {n} question(s); the search needs at least 2 (one held out)")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    k = min(n - 1, max(1, round(holdout * n)))
    return sorted(order[k:]), sorted(order[:k])


def _answers_agreement(model, tok, prepared, which, args, method, reference: dict[int, str]) -> float:
    from llava.eval import runner

    same = 0
    for i in which:
        ids, pixels, sizes = prepared[i]
        text, _, _ = runner.generate(model, tok, ids, pixels, sizes, args, method)
        same += int(text.strip() == reference[i].strip())
    return 100.0 * same / len(which)


def run(args: argparse.Namespace, loaded: tuple | None = None) -> dict[str, Any]:
    """The search the flags describe; writes and returns the schedule file's content."""
    from llava.eval import model_vqa_loader, runner
    from llava.eval.outputlock import OutputLock
    from llava.eval.runfiles import check_distinct_outputs
    from llava.utils import ensure_writable
    from pio import ReductionMethod, get_method, method_names
    from pio.encoder import EncoderMethod, Pipeline

    if args.budget is None:
        raise ValueError("--budget B is the average the schedule must meet (the paper's 64, 128, 192)")
    budget = float(args.budget)
    if budget != int(budget):
        raise ValueError(f"--budget {args.budget}: the optimiser takes a whole number of tokens per layer")
    if args.loyalty_to or args.schedule_file:
        raise ValueError("tune searches a schedule: --loyalty-to and --schedule-file apply to the question runners")
    if args.trials < 1:
        raise ValueError(f"--trials must be >= 1, got {args.trials}")
    method = runner.check_args(args)
    if method is None or isinstance(method, (EncoderMethod, Pipeline)) or method.encoder_stage() is not None:
        in_llm = [get_method(n) for n in method_names() if get_method(n).where == "llm"]
        staged = [c.name for c in in_llm if c.encoder_stage is not ReductionMethod.encoder_stage]
        plain = ", ".join(c.name for c in in_llm if c.name not in staged)
        raise ValueError(f"--method must name an in-LLM method without an encoder stage ({plain}"
                         + (f"; {', '.join(staged)} with explicit --tokens" if staged else "")
                         + "): the optimiser searches its stage layers and counts for a budget of the language "
                         "model's visual tokens")
    items, _ = model_vqa_loader.read_questions(args)
    state_path = args.state or args.out + ".state"
    check_distinct_outputs({"--out": args.out, "--state": state_path}, {"--question-file": args.question_file})
    for flag, path in (("--out", args.out), ("--state", state_path)):  # before the slow load and search
        if os.path.isdir(path):
            raise IsADirectoryError(f"{flag} {path} is a folder; give a file name")
        ensure_writable(os.path.dirname(os.path.abspath(path)), f"{flag} {path}")
    with OutputLock({"--out": args.out, "--state": state_path}):  # one search per schedule file and state
        return _search_and_write(args, loaded, method, items, budget, state_path)


def _search_and_write(args: argparse.Namespace, loaded: tuple | None, method: Any, items: list, budget: float,
                      state_path: str) -> dict[str, Any]:
    """:func:`run` once its flags are checked and its files locked."""
    from llava.eval import model_vqa_loader, runner
    from llava.eval.runfiles import file_sha256, weights_fingerprint
    from pio.schedule import average_visual_tokens

    search_ids, held_ids = _split(len(items), args.holdout, args.seed)
    config = {"model": weights_fingerprint(args.model_path), "method": method.config(), "budget": budget,
              "questions": file_sha256(args.question_file)[:16], "holdout": args.holdout, "seed": args.seed,
              "strategy": args.strategy, "objective": args.objective, "dtype": args.dtype,
              "conv_mode": args.conv_mode}
    state = SearchState(state_path, config)  # a state of other settings (or a broken one) refused before loading
    tok, model, proc, name = runner.load_model(args, method, loaded)
    depth = runner.decoder_depth(model.config)
    default_counts = method.schedule.counts(N0, depth)
    default = solve(method.schedule.layers, default_counts, budget, depth) or Candidate(
        tuple(method.schedule.layers), tuple(default_counts))
    prepared = [model_vqa_loader.prepare(args, q, tok, proc, model.config) for q in items]
    prepared = [(ids, runner.to_model(px, model) if px is not None else None, sizes) for ids, px, sizes in prepared]
    evaluator = Evaluator(model, prepared)

    def method_of(c: Candidate):
        return dataclasses.replace(method, schedule=tuned_schedule(c, budget, depth))

    def evaluate(c: Candidate) -> Divergence:
        cached = state.get(c.key)
        if cached is not None:
            return cached
        d = evaluator.divergence(method_of(c), search_ids)
        state.put(c.key, d)
        return d

    deadline = time.monotonic() + args.time_limit if args.time_limit else None
    with tqdm(total=args.trials, desc=f"tuning {method.name} at {budget:g}", unit="trial") as bar:
        result = search(default, evaluate, args.strategy, args.trials, budget, depth, args.seed, deadline, bar,
                        args.objective)
    # held out: choose between the found schedule and the default, report both
    held = {k: evaluator.divergence(method_of(c), held_ids) for k, c in (("default", default),
                                                                          ("found", result.best))}
    gen = argparse.Namespace(**{**vars(args), "temperature": 0.0, "max_new_tokens": args.answer_tokens})
    reference = {}
    for i in held_ids:
        ids, pixels, sizes = prepared[i]
        reference[i] = runner.generate(model, tok, ids, pixels, sizes, gen, None)[0]
    answers = {k: _answers_agreement(model, tok, prepared, held_ids, gen, method_of(c), reference)
               for k, c in (("default", default), ("found", result.best))}
    source = f"llava.eval.tune: {args.strategy} search, {result.trials} trials on {os.path.basename(args.question_file)}"
    chosen_name = "found" if not held["default"].better_than(held["found"], args.objective) else "default"
    chosen = result.best if chosen_name == "found" else default
    if chosen_name == "default":
        logger.warning("the schedule found on the search questions diverges more on the held-out ones than the "
                       "default: keeping the default")
    report = {k: {"search_kl": result.scores[c.key].kl, "search_first_token_same": result.scores[c.key].first_token_same,
                  "search_cosine": result.scores[c.key].cosine, "holdout_kl": held[k].kl,
                  "holdout_first_token_same": held[k].first_token_same, "holdout_cosine": held[k].cosine,
                  "holdout_same_answer": answers[k], "layers": list(c.layers), "tokens_at_576": list(c.counts)}
              for k, c in (("default", default), ("found", result.best))}
    out = {
        "format": SCHEDULE_FORMAT,
        "method": method.name,
        "budget": budget,
        "num_layers": depth,
        "schedule": tuned_schedule(chosen, budget, depth, source).to_dict(),
        "options": method.options(),
        "tokens_at_576": list(chosen.counts),
        "avg_visual_tokens_at_576": average_visual_tokens(N0, chosen.layers, chosen.counts, depth),
        "chosen": chosen_name,
        "model": name,
        "calibration": {"question_file": os.path.abspath(args.question_file), "questions": len(items),
                        "search": len(search_ids), "holdout": len(held_ids)},
        "search": {"strategy": args.strategy, "objective": args.objective, "trials": result.trials, "seed": args.seed},
        "report": report,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=2)
    os.replace(tmp, args.out)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from llava.eval import runner

    args = build_parser().parse_args(argv)
    runner.setup_logging()
    out = run(args)
    print(f"{'schedule':10} {'layers':>12} {'tokens@576':>14} {'KL search':>10} {'KL held':>9} {'cos held':>9} "
          f"{'1st tok %':>9} {'answer %':>9}")
    for k, r in out["report"].items():
        print(f"{k:10} {','.join(map(str, r['layers'])):>12} {','.join(map(str, r['tokens_at_576'])):>14} "
              f"{r['search_kl']:10.4f} {r['holdout_kl']:9.4f} {r['holdout_cosine']:9.4f} "
              f"{r['holdout_first_token_same']:9.1f} {r['holdout_same_answer']:9.1f}")
    print(f"chosen: {out['chosen']} -> {args.out} (run it with --schedule-file {args.out}, or SCHEDULE={args.out})")
    return out


if __name__ == "__main__":
    from llava.utils import cli

    cli(main)
