"""The whole demo (:func:`run_demo`): data, teacher, PTLoss coefficients, every student run (in a pool of
worker processes), table, ``results.json`` and ``results.png``."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any, Dict, List, Optional, Tuple

import torch

from tgtfast.demo.config import DemoConfig
from tgtfast.demo.data import DigitsSplits, few_label_subset, load_digits_splits
from tgtfast.metrics import classification_metrics
from tgtfast.demo.report import _atomic_write_text, format_table, format_weak_table, plot_results, summarise
from tgtfast.demo.students import _jobs, rows, train_student, train_weak_student, weak_jobs
from tgtfast.demo.teacher import (Teacher, _build_teacher, build_labeler, load_or_train_teacher,
                                  load_or_train_weak_labeler)


# The worker processes receive the teachers and the data once (pool initializer), then one job per student.
_WORKER: Dict[str, Any] = {}


def _worker_init(cfg: DemoConfig, splits: DigitsSplits, state: Dict[str, Any], metrics: Dict[str, float],
                 coeffs: Optional[torch.Tensor], threads: int, weak_state: Optional[Dict[str, Any]] = None) -> None:
    torch.set_num_threads(threads)
    labeler, vae = _build_teacher(cfg, state)
    weak = None if weak_state is None else Teacher(build_labeler(cfg, weak_state), vae, {})
    _WORKER.update(cfg=cfg, splits=splits, teacher=Teacher(labeler, vae, metrics), coeffs=coeffs, weak=weak)


def _run_job(job: Dict[str, Any]) -> Dict[str, Any]:
    method, loss, budget, seed = job["method"], job["loss"], job["budget"], job["seed"]
    cfg: DemoConfig = _WORKER["cfg"]
    splits: DigitsSplits = _WORKER["splits"]
    t0 = time.perf_counter()
    idx = few_label_subset(splits.y_train, budget, seed)
    # the same labelled subset and the same initial student for every method at a given (budget, seed)
    x, y, student_seed = splits.x_train[idx], splits.y_train[idx], 1000 * seed + budget
    if job["regime"] == "weak":
        coeffs = torch.tensor(job["coeffs"]) if loss == "ptloss" else None
        student = train_weak_student(method, loss, x, y, _WORKER["weak"], cfg, seed=student_seed,
                                     temperature=job["temperature"], val=(splits.x_val, splits.y_val), coeffs=coeffs)
    else:
        student = train_student(method, loss, x, y, _WORKER["teacher"], cfg, seed=student_seed,
                                coeffs=_WORKER["coeffs"] if loss == "ptloss" else None, pool=splits.x_train)
    out: Dict[str, Any] = {"method": method, "loss": loss, "budget": budget, "seed": seed}
    if job["regime"] == "weak":
        out["temperature"] = job["temperature"]
    with torch.no_grad():
        for split in ("val", "test"):
            m = classification_metrics(student(getattr(splits, f"x_{split}")), getattr(splits, f"y_{split}"),
                                       num_bins=cfg.ece_bins)
            out.update({f"{split}_accuracy": m["accuracy"], f"{split}_ece": m["ece"], f"{split}_nll": m["nll"]})
    out["seconds"] = time.perf_counter() - t0
    return {"regime": job["regime"], **out}


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


class _Serial:
    """The process pool's interface in this process: ``submit`` runs the job at once."""

    def submit(self, fn, *args):
        fut: Future = Future()
        fut.set_result(fn(*args))
        return fut


def _proxy(labels: torch.Tensor, teacher_logits: torch.Tensor, cfg: DemoConfig, temperature: float
           ) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """PTLoss coefficients from the Proxy Teacher on validation logits, and what ``results.json`` records."""
    import tgtfast

    res = tgtfast.search_coefficients(labels=labels, teacher_logits=teacher_logits, order=cfg.pt_order,
                                      num_candidates=cfg.pt_candidates, seed=cfg.pt_seed, temperature=temperature)
    coeffs = res.coeffs.detach().float().cpu()
    return coeffs, {"coeffs": coeffs.tolist(), "deviation": float(res.deviation),
                    "kl_deviation": float(res.kl_deviation), "global_check": res.global_check,
                    "temperature": temperature}


def pick_temperature(runs: List[Dict[str, Any]], temperatures) -> Tuple[float, List[Dict[str, Any]]]:
    """The temperature of the best mean validation accuracy over the second regime's KL runs (the smallest on a
    tie), and the search's record."""
    search = []
    for t in temperatures:
        accs = [r["val_accuracy"] for r in runs if r["method"] == "kd" and r["loss"] == "kl"
                and r["temperature"] == float(t)]
        search.append({"temperature": float(t), "val_accuracy_mean": sum(accs) / len(accs), "runs": len(accs)})
    best = max(search, key=lambda e: (e["val_accuracy_mean"], -e["temperature"]))
    return best["temperature"], search


def _run_demo(cfg: DemoConfig, out_dir: str, cache_dir: Optional[str], use_cache: bool, jobs: int, threads: int,
              progress: bool, log) -> Dict[str, Any]:
    from tgtfast.imperfect import MIN_PER_BIN

    t_start = time.perf_counter()
    splits = load_digits_splits(cfg.split_seed, cfg.val_fraction, cfg.test_fraction)
    weak_on = "weak" in cfg.regimes
    budgets = (cfg.budgets if "strong" in cfg.regimes else ()) + (cfg.weak_budgets if weak_on else ())
    for b in budgets:  # a budget the teacher-train split cannot fill fails here, before any training
        try:
            few_label_subset(splits.y_train, b, 0)
        except ValueError as exc:
            raise ValueError(f"budgets: {b} labelled examples cannot be drawn from the {len(splits.y_train)} "
                             f"teacher-train images ({exc})") from None
    if weak_on and len(splits.y_val) < MIN_PER_BIN * cfg.reliability_bins:
        raise ValueError(f"reliability_bins={cfg.reliability_bins} needs {MIN_PER_BIN * cfg.reliability_bins} "
                         f"validation rows ({MIN_PER_BIN} per bin); the split has {len(splits.y_val)}")
    os.makedirs(out_dir, exist_ok=True)
    teacher = load_or_train_teacher(cfg, splits, cache_dir, use_cache=use_cache, log=log)
    log(f"teacher: labeler test accuracy {100 * teacher.metrics['labeler_test_accuracy']:.1f} %, "
        f"validation {100 * teacher.metrics['labeler_val_accuracy']:.1f} %")
    weak_labeler, weak_info = None, {}
    if weak_on:
        weak_labeler, weak_info = load_or_train_weak_labeler(cfg, splits, cache_dir, use_cache=use_cache, log=log)
        log(f"weak teacher: test accuracy {100 * weak_info['labeler_test_accuracy']:.1f} %, ECE "
            f"{100 * weak_info['labeler_test_ece']:.1f} %, validation accuracy "
            f"{100 * weak_info['labeler_val_accuracy']:.1f} %")
    t_teacher = time.perf_counter() - t_start

    import tgtfast

    coeffs = None
    proxy: Dict[str, Any] = {}
    if "strong" in cfg.regimes and "ptloss" in cfg.losses and any(m != "onehot" for m in cfg.methods):
        with torch.no_grad():
            t_val = teacher.labeler(splits.x_val)
        coeffs, proxy = _proxy(splits.y_val, t_val, cfg, cfg.temperature)
        log(f"PTLoss coefficients from the Proxy Teacher on the validation split: deviation {proxy['deviation']:.3g} "
            f"(plain KL {proxy['kl_deviation']:.3g})")

    state = {"labeler": teacher.labeler.state_dict(), "vae": teacher.vae.state_dict()}
    weak_state = None if weak_labeler is None else weak_labeler.state_dict()
    todo = _jobs(cfg)
    weak_kl_left = sum(j["regime"] == "weak" for j in todo)
    n_weak_rest = len(weak_jobs(cfg, 1.0)) if weak_on else 0
    runs: List[Dict[str, Any]] = []
    weak_pick: Dict[str, Any] = {}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo) + n_weak_rest, desc="students", unit="run", file=sys.stderr)
    t0 = time.perf_counter()
    init = (cfg, splits, state, teacher.metrics, coeffs, threads, weak_state)
    try:
        if jobs == 1:
            saved = dict(_WORKER)
            _worker_init(*init)
            try:
                _execute(_Serial(), todo, runs, bar, weak_kl_left, cfg, splits, weak_labeler, weak_pick, log)
            finally:
                _WORKER.clear()
                _WORKER.update(saved)
        else:
            import multiprocessing as mp

            with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                                     initargs=init) as pool:
                _execute(pool, todo, runs, bar, weak_kl_left, cfg, splits, weak_labeler, weak_pick, log)
    finally:
        if bar is not None:
            bar.close()
    t_students = time.perf_counter() - t0
    strong_runs = [r for r in runs if r["regime"] == "strong"]
    strong_runs.sort(key=lambda r: (rows(cfg).index((r["method"], r["loss"])), r["budget"], r["seed"]))
    summary = summarise(strong_runs, cfg)
    tables = []
    if "strong" in cfg.regimes:
        tables.append(format_table(summary, cfg, teacher.metrics, len(splits.y_test), len(splits.y_train)))
    weak = None
    if weak_on:
        weak_runs = [r for r in runs if r["regime"] == "weak"]
        weak_runs.sort(key=lambda r: (rows(cfg, "weak").index((r["method"], r["loss"])), r["temperature"],
                                      r["budget"], r["seed"]))
        chosen = [r for r in weak_runs if r["method"] != "kd" or r["loss"] != "kl"
                  or r["temperature"] == weak_pick["temperature"]]
        weak = {"teacher": weak_info, "temperature": weak_pick["temperature"],
                "temperature_search": weak_pick["search"], "proxy_teacher": weak_pick["proxy"],
                "summary": summarise(chosen, cfg, "weak"), "runs": weak_runs}
        weak["table"] = format_weak_table(weak, cfg, len(splits.y_test))
        tables.append(weak["table"])
    result = {
        "config": dataclasses.asdict(cfg),
        "splits": splits.sizes(),
        "teacher": {**teacher.metrics, "cache_file": teacher.cache_path, "from_cache": teacher.from_cache,
                    "key": cfg.teacher_hash()},
        "proxy_teacher": proxy,
        "summary": summary,
        "runs": strong_runs,
        "weak_regime": weak,
        "table": "\n\n".join(tables),
        "seconds": {"teacher": t_teacher, "students": t_students, "total": time.perf_counter() - t_start},
        "jobs": jobs,
        "threads_per_job": threads,
        "versions": {"tgtfast": tgtfast.__version__, "torch": torch.__version__},
    }
    json_path = os.path.join(out_dir, "results.json")
    png_path = os.path.join(out_dir, "results.png")
    plot_results(summary, cfg, teacher.metrics["labeler_test_accuracy"], png_path,
                 teacher_ece=teacher.metrics.get("labeler_test_ece"), weak=weak)
    result["seconds"]["total"] = time.perf_counter() - t_start
    _atomic_write_text(json_path, json.dumps(result, indent=2) + "\n")
    result["files"] = {"json": json_path, "png": png_path}
    return result


def _execute(pool, todo: List[Dict[str, Any]], runs: List[Dict[str, Any]], bar, weak_kl_left: int,
             cfg: DemoConfig, splits: DigitsSplits, weak_labeler, weak_pick: Dict[str, Any], log) -> None:
    """Run ``todo`` on ``pool``, collecting ``runs``; once the second regime's KL runs are in, pick its
    temperature on validation, search its PTLoss coefficients and submit its other rows (into ``weak_pick``:
    ``temperature``, ``search``, ``proxy``)."""
    pending = {pool.submit(_run_job, job): job for job in todo}
    while pending:
        done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
        for fut in done:
            pending.pop(fut)
            r = fut.result()
            runs.append(r)
            if bar is not None:
                bar.update(1)
            if r["regime"] != "weak" or weak_pick:
                continue
            weak_kl_left -= 1
            if weak_kl_left:
                continue
            temperature, search = pick_temperature([x for x in runs if x["regime"] == "weak"],
                                                   cfg.weak_temperatures)
            with torch.no_grad():
                t_val = weak_labeler(splits.x_val)
            weak_coeffs, proxy = _proxy(splits.y_val, t_val, cfg, temperature)
            weak_pick.update(temperature=temperature, search=search, proxy=proxy)
            log(f"weak teacher: temperature {temperature:g} picked on validation ("
                + ", ".join(f"{e['temperature']:g}: {100 * e['val_accuracy_mean']:.1f} %" for e in search) + ")")
            for job in weak_jobs(cfg, temperature):
                job["coeffs"] = weak_coeffs.tolist()
                pending[pool.submit(_run_job, job)] = job
