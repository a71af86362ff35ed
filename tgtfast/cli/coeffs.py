"""``tgtfast coeffs``: PTLoss coefficients picked by the Proxy Teacher on a validation set.

``tgtfast coeffs --teacher PRED --labels LABELS [--order 5 ...] --out FILE`` reads ``.pt``/``.npy`` teacher
probabilities ``[N, K]`` (or logits with ``--logits``) and integer labels ``[N]``, runs
:func:`tgtfast.proxy.search_coefficients`, prints the result as JSON and writes it to ``--out`` (loadable with
``tgtfast.PTLoss(FILE)``). Every input file is read without unpickling arbitrary objects (``torch.load`` with
``weights_only=True``, ``numpy.load`` with ``allow_pickle=False``), and the output path is checked before the
search runs. A bad file or path is reported in one line naming the argument; the exit status is then 2.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import tempfile
import warnings
from typing import Optional, Sequence

import torch

__all__ = ["main"]


class UsageError(ValueError):
    """A bad file or path given on the command line (reported in one line, exit status 2)."""


def _load_array(path: str, what: str) -> torch.Tensor:
    """The single tensor held by the ``.npy`` or ``.pt``/``.pth`` file `path` given as ``--<what>``."""
    flag = f"--{what}"
    if not (path.endswith(".npy") or path.endswith(".pt") or path.endswith(".pth")):
        raise UsageError(f"{flag}: expected a .pt or .npy file, got {path}")
    if not os.path.isfile(path):
        raise UsageError(f"{flag}: {path} does not exist or is not a file")
    if path.endswith(".npy"):
        import numpy as np

        try:
            arr = np.load(path, allow_pickle=False)
        except ValueError as exc:
            if "allow_pickle" in str(exc):
                raise UsageError(
                    f"{flag}: {path} holds a NumPy object array, which needs unpickling and is not loaded; "
                    "save a numeric array (np.save(path, array.astype(...)))"
                ) from None
            raise UsageError(f"{flag}: cannot read {path} as a .npy array: {exc}") from None
        except (OSError, EOFError) as exc:
            raise UsageError(f"{flag}: cannot read {path} as a .npy array: {exc}") from None
        try:
            return torch.from_numpy(arr)
        except TypeError as exc:
            raise UsageError(f"{flag}: {path} holds an array of dtype {arr.dtype}, not numbers: {exc}") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. the weights-only unpickler's remark on the pickle protocol
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = str(exc)
        marker = "WeightsUnpickler error:"
        reason = detail[detail.index(marker) + len(marker):].strip().splitlines()[0] if marker in detail else ""
        raise UsageError(
            f"{flag}: {path} holds pickled objects other than tensors, which are not loaded (torch.load with "
            f"weights_only=True refused it{': ' + reason if reason else ''}); save a plain tensor "
            "(torch.save(tensor, path)) or a .npy array"
        ) from None
    except Exception as exc:  # a truncated or foreign file: torch raises RuntimeError, EOFError, ...
        raise UsageError(f"{flag}: cannot read {path} with torch.load: {type(exc).__name__}: {exc}") from None
    if isinstance(obj, dict) and len(obj) == 1:
        obj = next(iter(obj.values()))
    if not isinstance(obj, torch.Tensor):
        held = f"a dict with keys {sorted(map(str, obj))}" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise UsageError(f"{flag}: {path} does not hold a single tensor (it holds {held})")
    return obj


def _check_out(path: str) -> None:
    """Refuse an output path the result could not be written to, before the search runs."""
    if os.path.isdir(path):
        raise UsageError(f"--out: {path} is a directory; give a file name such as {os.path.join(path, 'coeffs.json')}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"--out: the directory {folder} of {path} does not exist; create it first")
    if os.path.exists(path):
        if not os.access(path, os.W_OK):
            raise UsageError(f"--out: {path} exists and is not writable")
        return
    try:  # what os.access cannot tell (read-only mounts, ACLs, running as root): try it
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise UsageError(f"--out: cannot create files in {folder}: {exc.strerror or exc}") from None


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tgtfast coeffs", description=__doc__.split("\n")[0].strip("`: "))
    ap.add_argument("--teacher", required=True, help="teacher probabilities [N, K] (.pt or .npy)")
    ap.add_argument("--labels", required=True, help="integer labels [N] (.pt or .npy)")
    ap.add_argument("--out", required=True, help="JSON file to write (read by tgtfast.PTLoss(path))")
    ap.add_argument("--logits", action="store_true", help="the teacher file holds logits, not probabilities")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--order", type=int, default=5)
    ap.add_argument("--num-candidates", type=int, default=100)
    ap.add_argument("--low", type=float, default=-1.0)
    ap.add_argument("--high", type=float, default=10.0)
    ap.add_argument("--shared", action="store_true", help="one coefficient per order for all classes ([M])")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--refine", action="store_true", help="gradient descent on D from the best candidate")
    ap.add_argument("--refine-steps", type=int, default=20)
    ap.add_argument("--all-deviations", action="store_true", help="print every candidate's deviation")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``tgtfast coeffs --teacher PRED --labels LABELS [--order 5 ...] --out FILE``: search PTLoss coefficients.

    Returns the exit status: 0, or 2 after a one-line message on stderr for a bad argument, file or path."""
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        _check_out(args.out)
        teacher = _load_array(args.teacher, "teacher")
        labels = _load_array(args.labels, "labels")
        from tgtfast.proxy.search import search_coefficients

        res = search_coefficients(
            teacher, labels, order=args.order, num_candidates=args.num_candidates, low=args.low, high=args.high,
            per_class=not args.shared, temperature=args.temperature, teacher_is_logits=args.logits,
            seed=args.seed, refine=args.refine, refine_steps=args.refine_steps,
        )
    except (ValueError, TypeError, OSError) as exc:
        print(f"tgtfast coeffs: error: {exc}", file=sys.stderr)
        return 2
    shown = res.to_dict()
    if not args.all_deviations:
        shown.pop("candidate_deviations")
    shown["out"] = os.fspath(args.out)
    try:
        res.save(args.out)
    except OSError as exc:  # the path was checked, but the disk can still fill up: keep the result on stdout
        print(json.dumps(shown, indent=2))
        print(f"tgtfast coeffs: error: --out: could not write {args.out}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(shown, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
