"""Self-evolution data generation: the current model makes its own preference pairs from plain VQA.

    python generate.py --model PATH|tiny [--adapter DIR] --data PATH|synth --out runs/gen

For each question (no box annotation needed) and each of --attempts K attempts, two candidates:
  a. sample a box (focus prompt), crop it, sample an answer (answer prompt with the crop);
  b. the diversity candidate: sample another box; if its IoU with (a)'s box is above 0.05, replace it by a random
     box of about (a)'s size that does not overlap (a)'s box; crop, sample an answer.
Every candidate gets an answer score and a crop-relevance score in [0, 1] (`--scorer rule|judge`), then the pair
filter keeps at most one (chosen, rejected) pair per question (upstream's filter.py).

Questions go --chunk at a time through run_chunk, each step's prompts in one sampler call; each question's line (every
candidate with its scores, plus its pair) is appended to candidates.jsonl and the pair to pairs.jsonl, flushed. A rerun
skips finished questions; sampling is seeded per chunk, so an in-process rerun reproduces an uninterrupted run exactly.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Callable, Literal

import tyro
from tqdm import tqdm

import chat
import data
import endpoint
import model
import runs
import synth

@dataclass
class GenerateConfig(runs.RunConfig):
    """Self-evolution data generation: sample boxes and answers, score them, keep preference pairs."""

    model: str = "tiny"  # checkpoint directory, or a tiny one (`tiny`, `tiny-qwen3-vl` ...; ignored with --endpoint)
    # the current policy's adapter (its parent stack is rebuilt and merged)
    adapter: Annotated[str | None, runs.default("none: the base model alone")] = None
    data: str = "synth"  # records file (Visual-CoT .jsonl/.json or ours; boxes optional), a directory, or `synth`
    out: str = "runs/generate"  # candidates.jsonl, pairs.jsonl, summary.json, config.json go here
    seed: int = 0  # chunk c samples with seed * 1000003 + 10c, so a resumed run reproduces an uninterrupted one
    split: str = "train"  # which <split>.jsonl of a directory / `synth`
    # upstream: only upstream's question pool, items 10000-20000 of each Visual-CoT subset (the records'
    # `dataset`), docvqa excluded (`preprocess/sample.py`); all: every record of --data
    question_pool: Literal["all", "upstream"] = "all"
    attempts: int = 3  # K: each attempt makes a sampled and a diversity candidate (upstream: 3)
    temperature: float = 2.0  # the policy's sampling temperature (upstream: 2)
    top_p: float = 0.7  # the policy's nucleus sampling mass (upstream: 0.7)
    top_k: int = 50  # the policy samples among this many likeliest tokens (upstream: 50)
    max_new_tokens: int = 1024  # the longest reply (box, answer, crop-alone answer), in tokens (upstream: 1024)
    batch_size: int = 16  # prompts per forward of the in-process model
    chunk: int = 8  # questions sampled together: each step's prompts of a chunk go to one model.sample call
    # sample from this OpenAI-compatible server instead of the in-process model
    endpoint: Annotated[str | None, runs.default("none: the in-process model")] = None
    endpoint_model: str = "default"  # the `model` field sent to --endpoint
    # rule: offline answer score, crop score = the answer from the crop alone; judge: upstream's two judge prompts
    # sent to --judge-endpoint
    scorer: Literal["rule", "judge"] = "rule"
    use_annotated_boxes: bool = False  # rule scorer: crop score = IoU with a record's annotated box, where it has one
    # the OpenAI-compatible server of the judge model (--scorer judge)
    judge_endpoint: Annotated[str | None, runs.default("none")] = None
    judge_model: str = "default"  # the `model` field sent to --judge-endpoint
    judge_max_tokens: int = 1024  # the longest judge reply, in tokens (upstream: 1024)
    workers: int = 8  # concurrent HTTP requests to --endpoint / --judge-endpoint
    retries: int = 2  # extra tries of a failed HTTP call before the run stops (finished questions are kept)
    timeout: float = 120.0  # seconds per HTTP call
    answer_high: float = 0.8  # chosen needs the top answer score; a question needs some answer score >= this
    answer_low: float = 0.2  # ... and some answer score <= this
    crop_high: float = 0.8  # chosen needs crop score >= this
    crop_low: float = 0.2  # rejected needs crop score <= this
    # strict: a box reply counts only if it is, whole, a JSON list of numbers, values above 1 cut at the image's edge
    # (upstream's `data_gen/generate.py`); lenient: the first four numbers of its first [...], none above 1
    box_replies: Literal["strict", "lenient"] = "strict"
    # a pair's box texts: rewritten with 3 decimals as upstream (`data_gen/eval/convert_statistic_format.py`) or kept
    pair_box_text: Literal["rewrite", "as-written"] = "rewrite"

    # which questions (more of them), and how the work is carried out: finished questions stay what they are
    rerun_may_change = runs.RunConfig.rerun_may_change + (
        "limit", "skip_bad_records", "image_root", "batch_size", "workers", "retries", "timeout")

OUT_FILES = ("candidates.jsonl", "pairs.jsonl", "summary.json", "config.json")  # what a run writes into --out

# sampler(prompts=[(messages, images)], sampling, seed) -> replies; judge(openai messages) -> reply text
Sampler = Callable[[list, "object", int], list[str]]
Judge = Callable[[list[dict]], str]

# ---- The diversity box ---------------------------------------------------------------------

DIVERSITY_IOU = 0.05  # above this IoU with (a)'s box, the second sample is replaced
TOLERANCE_START, TOLERANCE_STEP, TOLERANCE_EVERY, DIVERSITY_TRIES = 0.4, 0.1, 20, 100

def overlaps(a: data.Box, b: data.Box) -> bool:
    """True if the boxes share area (touching edges do not count, as upstream)."""
    return not (a[2] <= b[0] or a[0] >= b[2] or a[3] <= b[1] or a[1] >= b[3])

def diversity_box(first: data.Box, width: int, height: int, rng: random.Random,
                  valid: Callable[[data.Box], bool] = lambda box: True) -> tuple[data.Box, float] | None:
    """A random box inside the image, not overlapping `first`, each side within +-d of first's (relative; d = 0.4,
    +0.1 every 20 tries, 100 tries): (box, d used), or None if none was found. Upstream's generate_random_bounding_box,
    in pixels instead of axis-normalised units (same ratios); sides are capped at the image's, so it lies inside."""
    fw, fh = first[2] - first[0], first[3] - first[1]
    for i in range(DIVERSITY_TRIES):
        d = TOLERANCE_START + TOLERANCE_STEP * (i // TOLERANCE_EVERY)
        bw = rng.uniform((1 - d) * fw, min((1 + d) * fw, width))
        bh = rng.uniform((1 - d) * fh, min((1 + d) * fh, height))
        x1, y1 = rng.uniform(0, width - bw), rng.uniform(0, height - bh)
        box = (x1, y1, x1 + bw, y1 + bh)
        if not overlaps(box, first) and valid(box):
            return box, d
    return None

# ---- Scores and the pair filter ------------------------------------------------------------

def rule_answer_score(answer: str, references: str | list[str]) -> float:
    """max(exact match, ANLS, containment) against the best reference: normalised exact match is 1, a near miss (edit
    distance < half the length) gets partial ANLS credit, an answer containing a reference as whole words is 1."""
    return max(chat.answer_scores(answer, references).values())

# Upstream VisRL's two judge prompts (zhangquanchen/VisRL, data_gen/generate.py) verbatim, f-string indents included.
JUDGE_ANSWER_PROMPT = (
    "You are responsible for proofreading the answers, you need to give the score to the model's answer "
    "by referring to the standard answer, based on the given question and image.\n"
    "    The full score is 1 point and the minimum score is 0 points. Please directly provide the score in "
    "JSON format, for example, {{\"score\": 0.8}}, without showing the intermediate process.\n"
    "    The evaluation criteria require that the closer the model's answer is to the standard answer, "
    "the higher the score.\n"
    "\n"
    "    Question: {question}\n"
    "    Standard answer: {reference}\n"
    "    Model's answer: {answer}\n"
    "    ")
JUDGE_CROP_PROMPT = (
    "You are responsible for verifying the relevance of the image based on the provided question and "
    "standard answer, you need to assess whether the image aligns with the standard answer.\n"
    "    The full score is 1 point and the minimum score is 0 points. Please directly provide the score in "
    "JSON format, for example, {{\"score\": 0.8}}, without showing the intermediate process.\n"
    "    The evaluation criteria is that, the higher score will be if the image effectively encompasses "
    "the information provided in the standard answer based on question.\n"
    "\n"
    "    Question: {question}\n"
    "    Standard answer: {reference}\n"
    "    ")

def _judge_messages(prompt: str, record: data.Record, image, **fields) -> list[dict]:
    # Upstream's question is its prompt with '<image>\n' and the instruction removed: the question plus the space
    # that preceded the instruction. Several references are listed, separated by ' / '.
    text = prompt.format(question=record.question + " ", reference=" / ".join(dict.fromkeys(record.answers)), **fields)
    content = [{"type": "image"}, {"type": "text", "text": text}]
    return endpoint.to_openai_messages([{"role": "user", "content": content}], [image])

def judge_answer_messages(record: data.Record, answer: str, image) -> list[dict]:
    """OpenAI messages asking the judge to score an answer against the reference, with the full image."""
    return _judge_messages(JUDGE_ANSWER_PROMPT, record, image, answer=answer)

def judge_crop_messages(record: data.Record, crop) -> list[dict]:
    """OpenAI messages asking the judge how relevant the crop alone is to the question and reference."""
    return _judge_messages(JUDGE_CROP_PROMPT, record, crop)

_SCORE = re.compile(r"""["']?score["']?\s*[:=]\s*["']?([-+]?(?:\d+(?:\.\d*)?|\.\d+))""", re.IGNORECASE)

def parse_score_json(text: str) -> float | None:
    """The x of a judge's `{"score": x}` reply, tolerantly (code fences, a bare number, `score: x`, text around it);
    None if absent, ambiguous (different scores), non-finite or outside [0, 1]."""
    if not isinstance(text, str):
        return None
    body = re.sub(r"```(?:json)?", "", text).strip()
    try:
        obj = json.loads(body)
        value = obj.get("score") if isinstance(obj, dict) else obj
    except ValueError:  # json.JSONDecodeError included
        found = {float(m) for m in _SCORE.findall(body)}
        value = found.pop() if len(found) == 1 else None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    # a number outside [0, 1] is likely another scale (0-10, 0-100): not a score we can use, so no clip
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return None
    return float(value) if 0.0 <= value <= 1.0 else None

@dataclass
class Verdict:
    """The filter's decision for one question: indices into its candidates, or why it was dropped."""

    chosen: int | None
    rejected: int | None
    reason: str  # "kept" or the rule that dropped the question

def select_pair(answer_scores: list[float | None], crop_scores: list[float | None], answer_high: float = 0.8,
                answer_low: float = 0.2, crop_high: float = 0.8, crop_low: float = 0.2) -> Verdict:
    """The recipe's pair filter (upstream's filter.py): candidates with a missing score are ignored; drop the question
    if all answer scores are > answer_low, or all < answer_high, or all equal; chosen = first with the top answer
    score and crop >= crop_high; rejected = first with the lowest answer score and crop <= crop_low."""
    scored = [i for i, (a, c) in enumerate(zip(answer_scores, crop_scores)) if a is not None and c is not None]
    if not scored:
        return Verdict(None, None, "no scored candidate")
    top, low = max(answer_scores[i] for i in scored), min(answer_scores[i] for i in scored)
    for failed, reason in ((low > answer_low, "all answer scores > low"),
                           (top < answer_high, "all answer scores < high"), (top == low, "all answer scores equal")):
        if failed:
            return Verdict(None, None, reason)
    chosen = next((i for i in scored if answer_scores[i] == top and crop_scores[i] >= crop_high), None)
    rejected = next((i for i in scored if answer_scores[i] == low and crop_scores[i] <= crop_low), None)
    if chosen is None:
        return Verdict(None, rejected, "no chosen candidate (top answer score with crop >= high)")
    if rejected is None:
        return Verdict(chosen, None, "no rejected candidate (lowest answer score with crop <= low)")
    return Verdict(chosen, rejected, "kept")

# ---- Samplers: the in-process model (batched), an OpenAI-compatible endpoint (concurrent) --

class LocalSampler:
    """The in-process model: every prompt of a step in one model.sample call (batched, left-padded)."""

    def __init__(self, cfg: GenerateConfig):
        device = str(model.setup_distributed().device)  # under torchrun: this rank's device
        self.net, self.processor = model.load(cfg.model, cfg.adapter, device, cfg.dtype, cfg.max_pixels)
        self.batch_size = cfg.batch_size

    def __call__(self, prompts, sampling, seed):
        return model.sample(self.net, self.processor, prompts, sampling, self.batch_size, seed)

class EndpointSampler:
    """An OpenAI-compatible server (e.g. vLLM): one chat request per prompt, --workers at a time."""

    def __init__(self, cfg: GenerateConfig):
        self.cfg = cfg
        self.processor = None

    def __call__(self, prompts, sampling, seed):
        cfg = self.cfg
        with ThreadPoolExecutor(max(1, cfg.workers)) as pool:
            return list(pool.map(lambda prompt: endpoint.chat_completion(
                cfg.endpoint, endpoint.to_openai_messages(*prompt, cfg.max_pixels), cfg.endpoint_model,
                sampling.max_new_tokens, sampling.temperature, sampling.top_p, sampling.top_k or None, cfg.timeout,
                cfg.retries), prompts))

def endpoint_judge(cfg: GenerateConfig) -> Judge:
    """The judge behind --judge-endpoint, greedy (upstream: temperature 0)."""
    if not cfg.judge_endpoint:
        raise data.UserError("--scorer judge needs --judge-endpoint URL (an OpenAI-compatible server)")
    return lambda messages: endpoint.chat_completion(cfg.judge_endpoint, messages, cfg.judge_model,
                                                     cfg.judge_max_tokens, 0.0, 1.0, None, cfg.timeout, cfg.retries)

# ---- One chunk of questions: boxes -> diversity -> answers -> scores -> filter -------------

def policy_sampling(cfg: GenerateConfig) -> model.Sampling:
    """How the policy samples its boxes and answers (upstream: temperature 2, top-p 0.7, top-k 50)."""
    return model.Sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.top_k)

def _box_list(box):
    return None if box is None else [float(v) for v in box]  # unrounded: Acc@0.5 is computed from these

def sample_candidates(cfg: GenerateConfig, items: list[tuple[int, data.Record]], images: list, sampler: Sampler,
                      chunk_seed: int) -> tuple[list[list[dict]], list[tuple[int, dict, data.Box]]]:
    """Steps 1-2 of a chunk: 2K box replies per question in one sampler call, parsed (a malformed box is counted and
    dropped), the diversity rule applied. Returns every question's candidates, and the live ones as (question no.,
    candidate, pixel box)."""
    image_processor = getattr(getattr(sampler, "processor", None), "image_processor", None)
    K = cfg.attempts
    prompts = [(chat.focus_messages(r.question, cfg.prompts, rl=True), [image])  # the RL box step's instruction
               for (_, r), image in zip(items, images) for _ in range(2 * K)]
    replies = sampler(prompts, policy_sampling(cfg), chunk_seed)
    questions, live = [], []
    for q, (index, r) in enumerate(items):
        def parse(text, r=r):
            return chat.read_box(text, r.width, r.height, cfg.box_form, image_processor, cfg.box_replies == "strict")

        def as_text(box, r=r):
            return chat.write_box(box, r.width, r.height, cfg.box_form, image_processor)

        rng = random.Random(f"{cfg.seed}:{index}:{r.id}")  # the diversity box depends on nothing else
        candidates = []
        for k in range(K):
            a_reply, b_reply = replies[2 * (q * K + k):2 * (q * K + k) + 2]
            a_box, b_box = parse(a_reply), parse(b_reply)
            a, b = (dict(attempt=k, kind=kind, box_reply=reply, box_text=reply, box=_box_list(box), replaced=False,
                         dropped=None if box is not None else "box parse failure")
                    for kind, reply, box in (("sampled", a_reply, a_box), ("diversity", b_reply, b_box)))
            if a_box is not None and b_box is not None and chat.iou(a_box, b_box) > DIVERSITY_IOU:
                # the replacement must survive its own text form (3 decimals or integer pixels)
                found = diversity_box(a_box, r.width, r.height, rng,
                                      lambda box: (p := parse(as_text(box))) is not None and not overlaps(p, a_box))
                if found is None:
                    b.update(dropped="no diversity box")
                else:
                    b_box = parse(as_text(found[0]))
                    b.update(box_text=as_text(found[0]), box=_box_list(b_box), replaced=True, tolerance=found[1])
            elif a_box is None and b_box is not None:
                b.update(dropped="no first box")  # nothing to diverge from (upstream drops the attempt too)
            candidates += [a, b]
            live += [(q, cand, box) for cand, box in ((a, a_box), (b, b_box)) if cand["dropped"] is None]
        questions.append(candidates)
    return questions, live

def score_candidates(cfg: GenerateConfig, items: list[tuple[int, data.Record]], images: list, live: list[tuple],
                     sampler: Sampler, judge: Judge | None, chunk_seed: int) -> dict[int, str]:
    """Step 4: each answered candidate's answer and crop scores, in place; returns each question's crop-score source.
    The rule scorer asks the crop alone (or, with --use-annotated-boxes, measures the IoU with the record's box); the
    judge scorer sends upstream's two prompts, a reply it cannot parse dropping the candidate."""
    if cfg.scorer == "judge":
        requests = [m for q, cand, crop in live for m in (
            judge_answer_messages(items[q][1], cand["answer"], images[q]), judge_crop_messages(items[q][1], crop))]
        with ThreadPoolExecutor(max(1, cfg.workers)) as pool:
            replies = list(pool.map(judge, requests))
        for (_, cand, _), answer, crop in zip(live, replies[::2], replies[1::2]):
            cand["judge_replies"] = {"answer": answer, "crop": crop}
            cand["answer_score"], cand["crop_score"] = parse_score_json(answer), parse_score_json(crop)
            cand["judge_parse_failures"] = (cand["answer_score"] is None) + (cand["crop_score"] is None)
            if cand["judge_parse_failures"]:
                cand["dropped"] = "judge reply unparseable"
        return {q: "judge" for q in range(len(items))}
    # annotated boxes are read only when asked: the recipe's pairs need no box annotation
    gt = {q: items[q][1].box if cfg.use_annotated_boxes else None for q in range(len(items))}
    for q, cand, _ in live:
        cand["answer_score"] = rule_answer_score(cand["answer"], items[q][1].answers)
        if gt[q] is not None:
            cand["crop_score"] = chat.iou(cand["box"], gt[q])
    probe = [x for x in live if gt[x[0]] is None]  # no box: the crop is relevant if it alone gives the answer
    prompts = [(chat.direct_messages(items[q][1].question, cfg.prompts), [crop]) for q, _, crop in probe]
    answers = sampler(prompts, model.Sampling(cfg.max_new_tokens, 0.0), chunk_seed + 2) if probe else []
    for (q, cand, _), answer in zip(probe, answers):
        cand["crop_answer"] = answer
        cand["crop_score"] = rule_answer_score(answer, items[q][1].answers)
    return {q: "iou with gt box" if gt[q] is not None else "answer from crop alone" for q in range(len(items))}

def run_chunk(cfg: GenerateConfig, items: list[tuple[int, data.Record]], sampler: Sampler,
              judge: Judge | None, chunk_seed: int, root: str) -> list[dict]:
    """The candidates.jsonl line of each (index, record): its candidates with scores, verdict and pair.
    Steps: boxes (sample_candidates) -> answers on their crops -> scores (score_candidates) -> the filter."""
    images = [data.load_image(r) for _, r in items]
    questions, live = sample_candidates(cfg, items, images, sampler, chunk_seed)
    # 3. all answers of the chunk at once, each on its box's crop: the step-2 half of chat.two_step
    policy = policy_sampling(cfg)
    steps = chat.two_step(lambda prompts: sampler(prompts, policy, chunk_seed + 1), [images[q] for q, _, _ in live],
                          None, [items[q][1].question for q, _, _ in live], cfg.crop, cfg.prompts,
                          boxes=[(cand["box_text"], box) for _, cand, box in live])
    for (_, cand, _), step in zip(live, steps):
        cand["answer"] = step["answer"]
        if not step["answer"]:
            cand["dropped"] = "empty answer"  # a pair record needs a non-empty response
    answered = [(q, cand, images[q].crop(tuple(step["crop"]))) for (q, cand, _), step in zip(live, steps)
                if cand["dropped"] is None]
    sources = score_candidates(cfg, items, images, answered, sampler, judge, chunk_seed)
    lines = []
    for q, ((index, r), candidates) in enumerate(zip(items, questions)):
        usable = [c if c["dropped"] is None else {} for c in candidates]
        verdict = select_pair([c.get("answer_score") for c in usable], [c.get("crop_score") for c in usable],
                              cfg.answer_high, cfg.answer_low, cfg.crop_high, cfg.crop_low)
        pair = None
        if verdict.reason == "kept":
            win, lose = candidates[verdict.chosen], candidates[verdict.rejected]
            texts = [c["box_text"] if cfg.pair_box_text == "as-written" else
                     chat.rewrite_box_text(c["box_text"], cfg.box_form) for c in (win, lose)]
            pair = data.pair_json(data.Pair(r, *texts, win["answer"], lose["answer"], cfg.box_form), root)
        lines.append({"index": index, "id": r.id, "question": r.question, "answers": r.answers,
                      "gt_box": _box_list(r.box), "crop_score_source": sources[q], "candidates": candidates,
                      "verdict": verdict.reason, "chosen": verdict.chosen, "rejected": verdict.rejected,
                      "pair": pair})
    return lines

# ---- Files: append-only lines, resume, summary ---------------------------------------------

def summarize(lines: list[dict]) -> dict:
    """Counts over finished questions (all runs in --out), and Acc@0.5 of chosen vs rejected boxes."""
    cands = [c for line in lines for c in line["candidates"]]
    dropped = Counter(c["dropped"] for c in cands if c["dropped"])
    pairs = [line for line in lines if line["pair"] is not None]
    summary = {"questions": len(lines), "candidates": len(cands),
               "candidates_scored": sum(c["dropped"] is None for c in cands),
               "box_parse_failures": dropped["box parse failure"],
               "judge_parse_failures": sum(c.get("judge_parse_failures", 0) for c in cands),
               "diversity_replaced": sum(c["replaced"] for c in cands), "dropped_candidates": dict(dropped),
               "pairs_kept": len(pairs), "verdicts": dict(Counter(line["verdict"] for line in lines)),
               "crop_score_source": dict(Counter(line["crop_score_source"] for line in lines))}
    with_gt = [line for line in pairs if line["gt_box"] is not None]
    if with_gt:  # correct iff IoU > 0.5, strictly, as the benchmark counts it
        summary["pairs_with_gt_box"] = len(with_gt)
        right = [{key: chat.iou(line["candidates"][line[key]]["box"], line["gt_box"]) > 0.5
                  for key in ("chosen", "rejected")} for line in with_gt]
        for key in ("chosen", "rejected"):
            summary[f"{key}_acc@0.5"] = sum(r[key] for r in right) / len(right)
        # upstream's data_gen/eval/statistic_bbox.py: the share of pairs in each cell of chosen x rejected box right
        cells = Counter((r["chosen"], r["rejected"]) for r in right)
        summary["box_table"] = {f"chosen {'right' if c else 'wrong'}, rejected {'right' if j else 'wrong'}":
                                cells[(c, j)] / len(right) for c, j in ((1, 1), (1, 0), (0, 0), (0, 1))}
    return summary

def read_questions(cfg: GenerateConfig) -> tuple[list[data.Record], Path, str]:
    """(records, their file, the image root pair files record) of --data, upstream's question pool if asked."""
    data_path = synth.resolve_data(cfg.data, cfg.split, cfg.seed)
    root = str(Path(cfg.image_root if cfg.image_root is not None else Path(data_path).parent).resolve())
    records = data.read_records(data_path, image_root=cfg.image_root, skip_bad=cfg.skip_bad_records, limit=cfg.limit)
    if cfg.question_pool == "upstream":
        records = data.upstream_question_pool(records)
        if not records:
            raise data.UserError(f"{data_path}: upstream's question pool (items 10000-20000 of each Visual-CoT subset, "
                                 "docvqa excluded) is empty in this file; --question-pool all takes every record")
    return records, data_path, root

def finished_questions(out: Path, records: list[data.Record], data_path: Path, root: str) -> list[dict]:
    """The finished questions' lines of an earlier run in --out, and pairs.jsonl rewritten from them: a pair whose
    question did not finish goes, one lost between the two writes comes back."""
    cand_path, pair_path = out / "candidates.jsonl", out / "pairs.jsonl"
    lines = []
    for n, line in data.read_jsonl_rows(cand_path, repair=True, numbered=True):  # a torn last line is cut off, redone
        if not isinstance(line.get("index"), int) or "pair" not in line:
            raise data.DataError(f"{cand_path}:{n}: field 'index'/'pair': not a candidates line written by generate.py")
        lines.append(line)
    for line in lines:
        i = line["index"]
        if i < len(records) and records[i].id != line["id"]:
            raise data.UserError(f"{cand_path}: question {i} is {line['id']!r} there but {records[i].id!r} in "
                                 f"{data_path}: another data set; use a fresh --out")
    tmp = pair_path.with_suffix(".jsonl.tmp")
    # (lines written before pair files recorded their image root get this run's: their paths are relative to it)
    tmp.write_text("".join(json.dumps({**line["pair"], "image_root": line["pair"].get("image_root", root)}) + "\n"
                           for line in lines if line["pair"] is not None))
    os.replace(tmp, pair_path)
    return lines

def generate(cfg: GenerateConfig, sampler: Sampler | None = None, judge: Judge | None = None) -> dict:
    """Make candidates and pairs for every question in cfg.data into cfg.out (resuming, under its lock); the summary."""
    cfg = runs.resolve_convention(cfg)  # the policy adapter's prompts, crop, pixel cap and box form
    if cfg.attempts < 1 or cfg.chunk < 1 or cfg.batch_size < 1:
        raise data.UserError("--attempts, --chunk and --batch-size must be at least 1")
    if cfg.box_form == "pixel" and cfg.endpoint:
        raise data.UserError("--box-form pixel needs the in-process model (its image processor sizes the view), "
                             "not --endpoint")
    if cfg.scorer == "judge" and judge is None:
        judge = endpoint_judge(cfg)
    out = Path(cfg.out)
    inputs = model.input_dirs(None if cfg.endpoint else cfg.model, cfg.adapter)
    data_files = [] if cfg.data == "synth" else [("--data", synth.resolve_data(cfg.data, cfg.split))]
    # the same settings resume the run in --out, others are refused; --overwrite replaces it once the data is read
    replaced = runs.check_out(out, OUT_FILES, inputs=inputs, data_files=data_files, resume=not cfg.overwrite,
                              overwrite=cfg.overwrite)
    if not replaced:
        runs.check_rerun(out, "generate", cfg, "rerun it")
    with runs.RunLock(out, "generate").take(create=False) as lock:
        records, data_path, root = read_questions(cfg)
        if sampler is None:  # loaded before --overwrite deletes anything: an unusable model or adapter costs nothing
            sampler = EndpointSampler(cfg) if cfg.endpoint else LocalSampler(cfg)
        lock.take()
        runs.clear_run(replaced)
        tokenizer = getattr(getattr(sampler, "processor", None), "tokenizer", None)  # none: an endpoint decodes
        decoding = None if tokenizer is None else {  # the policy's samples; the rule scorer's greedy crop answers
            "sampled": model.decoding_record(tokenizer, policy_sampling(cfg)),
            "greedy": model.decoding_record(tokenizer, model.Sampling(cfg.max_new_tokens, 0.0))}
        runs.write_config(out, "generate", cfg, decoding)
        lines = finished_questions(out, records, data_path, root)
        summary = generate_pairs(cfg, records, lines, sampler, judge, root)
    print(json.dumps(summary, indent=2))
    if summary["pairs_kept"]:
        print(f"generate: {summary['pairs_kept']} pairs from {summary['questions']} questions in "
              f"{out / 'pairs.jsonl'}; train on them with: python visrl.py dpo --stage 1 --data {out / 'pairs.jsonl'}"
              + (f" --init-adapter {cfg.adapter}" if cfg.adapter else ""), file=sys.stderr)
    return summary

def generate_pairs(cfg: GenerateConfig, records: list[data.Record], lines: list[dict], sampler: Sampler,
                   judge: Judge | None, root: str) -> dict:
    """The questions not finished yet, chunk by chunk: each line appended to candidates.jsonl (and its pair to
    pairs.jsonl) and flushed as its chunk ends; then summary.json. Returns the summary."""
    out = Path(cfg.out)
    done = {line["index"] for line in lines}
    todo = [i for i in range(len(records)) if i not in done]
    kept = sum(line["pair"] is not None for line in lines)
    start, new_candidates = time.time(), 0
    with tqdm(total=len(records), initial=len(records) - len(todo), desc="generate", dynamic_ncols=True) as progress, \
            open(out / "candidates.jsonl", "a", encoding="utf-8") as cand_file, \
            open(out / "pairs.jsonl", "a", encoding="utf-8") as pair_file:
        progress.set_postfix_str(f"pairs {kept}")
        # chunks are fixed index ranges, each with its own seed, and a chunk is always sampled whole (finished
        # questions are recomputed but not written): a resumed run samples exactly what an uninterrupted one would
        for c in sorted({i // cfg.chunk for i in todo}):
            items = [(i, records[i]) for i in range(c * cfg.chunk, min((c + 1) * cfg.chunk, len(records)))]
            for line in run_chunk(cfg, items, sampler, judge, cfg.seed * 1_000_003 + 10 * c, root):
                if line["index"] in done:
                    continue
                cand_file.write(json.dumps(line) + "\n")  # the commit point of a question
                cand_file.flush()
                if line["pair"] is not None:
                    pair_file.write(json.dumps(line["pair"]) + "\n")
                    pair_file.flush()
                    kept += 1
                lines.append(line)
                new_candidates += len(line["candidates"])
                progress.update(1)
                progress.set_postfix_str(f"pairs {kept}")
    elapsed = time.time() - start
    summary = summarize(lines)
    summary.update(questions_in_data=len(records), image_root=root,
                   this_run={"questions": len(todo), "candidates": new_candidates, "seconds": round(elapsed, 3),
                             "candidates_per_s": round(new_candidates / elapsed, 3) if elapsed > 0 else None})
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary

def generate_command(cfg: GenerateConfig) -> dict:
    """`python generate.py` / `visrl.py generate`: generate, and fail (exit 2), saying why, when no pair was kept."""
    summary = generate(cfg)
    if summary["pairs_kept"] == 0:  # exit 0 only when it did what was asked
        verdicts = ", ".join(f"{n} {reason}" for reason, n in sorted(summary["verdicts"].items()))
        raise data.UserError(f"generate: no preference pair kept from {summary['questions']} questions ({verdicts}); "
                             f"{summary['box_parse_failures']} of {summary['candidates']} candidates had a box that "
                             "did not parse. A pair needs a question the model answers both right and wrong: train "
                             "the policy further, lower --temperature, raise --attempts, or widen "
                             "--answer-high/--answer-low")
    return summary

def main() -> None:
    runs.cli(lambda: tyro.cli(GenerateConfig), generate_command)

if __name__ == "__main__":
    main()
