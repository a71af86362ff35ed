"""The whole demo (:func:`run_demo`): data, teacher, PTLoss coefficients, every student run (in a pool of
worker processes), table, ``results.json`` and ``results.png``."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, Dict, List, Optional, Tuple

import torch

from tgtfast.demo.config import DemoConfig
from tgtfast.demo.data import DigitsSplits, few_label_subset, load_digits_splits
from tgtfast.metrics import classification_metrics
from tgtfast.demo.report import _atomic_write_text, format_table, plot_results, summarise
from tgtfast.demo.students import _jobs, rows, train_student
from tgtfast.demo.teacher import Teacher, _build_teacher, load_or_train_teacher


# The worker processes receive the teacher and the data once (pool initializer), then one job per student.
_WORKER: Dict[str, Any] = {}


def _worker_init(cfg: DemoConfig, splits: DigitsSplits, state: Dict[str, Any], metrics: Dict[str, float],
                 coeffs: Optional[torch.Tensor], threads: int) -> None:
    torch.set_num_threads(threads)
    labeler, vae = _build_teacher(cfg, state)
    _WORKER.update(cfg=cfg, splits=splits, teacher=Teacher(labeler, vae, metrics), coeffs=coeffs)


def _run_job(job: Tuple[str, str, int, int]) -> Dict[str, Any]:
    method, loss, budget, seed = job
    cfg: DemoConfig = _WORKER["cfg"]
    splits: DigitsSplits = _WORKER["splits"]
    t0 = time.perf_counter()
    idx = few_label_subset(splits.y_train, budget, seed)
    # the same labelled subset and the same initial student for every method at a given (budget, seed)
    student = train_student(method, loss, splits.x_train[idx], splits.y_train[idx], _WORKER["teacher"], cfg,
                            seed=1000 * seed + budget, coeffs=_WORKER["coeffs"] if loss == "ptloss" else None,
                            pool=splits.x_train)
    out: Dict[str, Any] = {"method": method, "loss": loss, "budget": budget, "seed": seed}
    with torch.no_grad():
        for split in ("val", "test"):
            m = classification_metrics(student(getattr(splits, f"x_{split}")), getattr(splits, f"y_{split}"),
                                       num_bins=cfg.ece_bins)
            out.update({f"{split}_accuracy": m["accuracy"], f"{split}_ece": m["ece"], f"{split}_nll": m["nll"]})
    out["seconds"] = time.perf_counter() - t0
    return out


def run_demo(cfg: DemoConfig, out_dir: str = "tgtfast-demo", *, cache_dir: Optional[str] = None,
             use_cache: bool = True, jobs: Optional[int] = None, threads: int = 1, progress: bool = True,
             log=print) -> Dict[str, Any]:
    """Run the whole demo (see the module docstring); returns what ``results.json`` holds."""
    cfg.validate()
    if jobs is None:
        jobs = max(1, min(2, os.cpu_count() or 1))
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive integer, got {jobs!r}")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run_demo(cfg, out_dir, cache_dir, use_cache, jobs, threads, progress, log)
    finally:
        torch.set_num_threads(threads_before)


def _run_demo(cfg: DemoConfig, out_dir: str, cache_dir: Optional[str], use_cache: bool, jobs: int, threads: int,
              progress: bool, log) -> Dict[str, Any]:
    t_start = time.perf_counter()
    splits = load_digits_splits(cfg.split_seed, cfg.val_fraction, cfg.test_fraction)
    for b in cfg.budgets:  # a budget the teacher-train split cannot fill fails here, before any training
        try:
            few_label_subset(splits.y_train, b, 0)
        except ValueError as exc:
            raise ValueError(f"budgets: {b} labelled examples cannot be drawn from the {len(splits.y_train)} "
                             f"teacher-train images ({exc})") from None
    os.makedirs(out_dir, exist_ok=True)
    teacher = load_or_train_teacher(cfg, splits, cache_dir, use_cache=use_cache, log=log)
    t_teacher = time.perf_counter() - t_start
    log(f"teacher: labeler test accuracy {100 * teacher.metrics['labeler_test_accuracy']:.1f} %, "
        f"validation {100 * teacher.metrics['labeler_val_accuracy']:.1f} %")

    import tgtfast

    coeffs = None
    proxy: Dict[str, Any] = {}
    if "ptloss" in cfg.losses and any(m != "onehot" for m in cfg.methods):
        with torch.no_grad():
            t_val = teacher.labeler(splits.x_val)
        res = tgtfast.search_coefficients(labels=splits.y_val, teacher_logits=t_val, order=cfg.pt_order,
                                          num_candidates=cfg.pt_candidates, seed=cfg.pt_seed,
                                          temperature=cfg.temperature)
        coeffs = res.coeffs.detach().float().cpu()
        proxy = {"coeffs": coeffs.tolist(), "deviation": float(res.deviation), "kl_deviation": float(res.kl_deviation),
                 "global_check": res.global_check}
        log(f"PTLoss coefficients from the Proxy Teacher on the validation split: deviation {res.deviation:.3g} "
            f"(plain KL {res.kl_deviation:.3g})")

    state = {"labeler": teacher.labeler.state_dict(), "vae": teacher.vae.state_dict()}
    todo = _jobs(cfg)
    runs: List[Dict[str, Any]] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="students", unit="run", file=sys.stderr)
    t0 = time.perf_counter()
    try:
        if jobs == 1:
            saved = dict(_WORKER)
            _worker_init(cfg, splits, state, teacher.metrics, coeffs, threads)
            try:
                for job in todo:
                    runs.append(_run_job(job))
                    if bar is not None:
                        bar.update(1)
            finally:
                _WORKER.clear()
                _WORKER.update(saved)
        else:
            import multiprocessing as mp

            with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                                     initargs=(cfg, splits, state, teacher.metrics, coeffs, threads)) as pool:
                futures = [pool.submit(_run_job, job) for job in todo]
                for fut in as_completed(futures):
                    runs.append(fut.result())
                    if bar is not None:
                        bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    t_students = time.perf_counter() - t0
    runs.sort(key=lambda r: (rows(cfg).index((r["method"], r["loss"])), r["budget"], r["seed"]))
    summary = summarise(runs, cfg)
    table = format_table(summary, cfg, teacher.metrics, len(splits.y_test), len(splits.y_train))
    result = {
        "config": dataclasses.asdict(cfg),
        "splits": splits.sizes(),
        "teacher": {**teacher.metrics, "cache_file": teacher.cache_path, "from_cache": teacher.from_cache,
                    "key": cfg.teacher_hash()},
        "proxy_teacher": proxy,
        "summary": summary,
        "runs": runs,
        "table": table,
        "seconds": {"teacher": t_teacher, "students": t_students, "total": time.perf_counter() - t_start},
        "jobs": jobs,
        "threads_per_job": threads,
        "versions": {"tgtfast": tgtfast.__version__, "torch": torch.__version__},
    }
    json_path = os.path.join(out_dir, "results.json")
    png_path = os.path.join(out_dir, "results.png")
    plot_results(summary, cfg, teacher.metrics["labeler_test_accuracy"], png_path,
                 teacher_ece=teacher.metrics.get("labeler_test_ece"))
    result["seconds"]["total"] = time.perf_counter() - t_start
    _atomic_write_text(json_path, json.dumps(result, indent=2) + "\n")
    result["files"] = {"json": json_path, "png": png_path}
    return result
