"""Counts, per config class and entry point, how generated invalid inputs fail and whether valid ones construct.

    python tests/scripts/fuzz_validation.py --invalid 300 --valid 30

Invalid inputs change one field (or one conflicting pair) of a valid call (see tests/validation_specs.py); each is
`clean` (ValueError/TypeError naming the field), `unclear` (ValueError/TypeError not naming it), `wrong-type` (any
other exception) or `accepted`. Prints a Markdown table and writes JSON with --json. Examples that fail are listed
(first few per target) so they can be fixed.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(HERE))

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from tiny_models import tiny_llama  # noqa: E402
from validation_specs import all_targets, classify  # noqa: E402


def _settings(examples: int):
    return settings(
        max_examples=examples,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )


def _run_target(target, counts: collections.Counter, failures: list, invalid: int, valid: int) -> None:
    @_settings(invalid)
    @given(case=target.invalid())
    def run_invalid(case):
        field, kwargs = case
        outcome = classify(target, field, kwargs)
        counts[outcome] += 1
        if outcome != "clean" and len(failures) < 8:
            failures.append(f"{outcome}: {field} in {kwargs!r}"[:300])

    @_settings(max(valid, 1))
    @given(kwargs=target.valid_kwargs())
    def run_valid(kwargs):
        try:
            target.call(kwargs)
        except Exception as err:  # noqa: BLE001 - the outcome being measured
            counts["valid-rejected"] += 1
            if len(failures) < 8:
                failures.append(f"valid rejected: {kwargs!r}: {type(err).__name__}: {err}"[:300])
        else:
            counts["valid-ok"] += 1

    run_invalid()
    if valid:
        run_valid()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--invalid", type=int, default=300, help="invalid inputs per target")
    parser.add_argument("--valid", type=int, default=30, help="valid inputs per target (capped for slow targets)")
    parser.add_argument("--only", nargs="*", help="target names to run")
    parser.add_argument("--json", help="write the counts here")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    tmp = tempfile.mkdtemp(prefix="hf_compress_fuzz_")
    model_dir = str(Path(tmp) / "llama")
    tiny_llama().save_pretrained(model_dir)
    results, failures = {}, collections.defaultdict(list)
    for target in all_targets(tmp, tiny_llama, model_dir):
        if args.only and target.name not in args.only:
            continue
        counts = collections.Counter()
        valid_cap = args.valid if target.max_valid is None else min(args.valid, target.max_valid)
        _run_target(target, counts, failures[target.name], args.invalid, valid_cap)
        results[target.name] = dict(counts)
        print(f"{target.name}: {dict(counts)}", flush=True)

    print(
        "\n| target | invalid generated | failed cleanly | unclear message | wrong exception | accepted | valid ok |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    totals = collections.Counter()
    for name, c in results.items():
        invalid = sum(c.get(k, 0) for k in ("clean", "unclear", "wrong-type", "accepted"))
        valid = f"{c.get('valid-ok', 0)}/{c.get('valid-ok', 0) + c.get('valid-rejected', 0)}"
        print(
            f"| {name} | {invalid} | {c.get('clean', 0)} | {c.get('unclear', 0)} | {c.get('wrong-type', 0)} | "
            f"{c.get('accepted', 0)} | {valid} |"
        )
        totals.update(c)
    invalid = sum(totals.get(k, 0) for k in ("clean", "unclear", "wrong-type", "accepted"))
    print(
        f"| **all** | {invalid} | {totals['clean']} | {totals['unclear']} | {totals['wrong-type']} | "
        f"{totals['accepted']} | {totals['valid-ok']}/{totals['valid-ok'] + totals['valid-rejected']} |"
    )
    for name, items in failures.items():
        if not items:
            continue
        print(f"\n{name}:")
        for item in items:
            print("  -", item)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
