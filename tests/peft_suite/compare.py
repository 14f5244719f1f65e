"""Compares the plain and the fused pass of peft's own test suite (junit xml files) and
writes a JSON and a markdown summary. Exit status 1 when a test fails only with the fused
layer (or was not run by the fused pass), unless expected_differences.txt names it.

usage: python compare.py PLAIN.xml FUSED.xml COVERAGE.json OUT_PREFIX EXPECTED.txt
"""
from __future__ import annotations

import collections
import fnmatch
import json
import sys
import xml.etree.ElementTree as ET

BAD = ("failed", "error")


def outcomes(path: str) -> dict[str, str]:
    """Test id -> passed / failed / error / skipped, from a pytest junit xml file."""
    result = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        test_id = f"{case.get('classname')}::{case.get('name')}"
        kinds = {child.tag for child in case}
        if "error" in kinds:
            result[test_id] = "error"  # an error in teardown after a failure is still bad
        elif "failure" in kinds:
            result[test_id] = "failed"
        elif "skipped" in kinds:
            result[test_id] = "skipped"
        else:
            result[test_id] = "passed"
    return result


def read_expected(path: str) -> list[str]:
    globs = []
    with open(path) as f:
        for line in f:
            pattern, _, reason = line.partition("#")
            if pattern.strip():
                if not reason.strip():
                    raise SystemExit(f"{path}: {pattern.strip()!r} gives no reason")
                globs.append(pattern.strip())
    return globs


def compare(plain: dict[str, str], fused: dict[str, str], expected: list[str]) -> dict:
    fused_only, missing, fixed = [], [], []
    for test_id, p in sorted(plain.items()):
        f = fused.get(test_id)
        if f is None:
            missing.append(test_id)
        elif f in BAD and p not in BAD:
            fused_only.append(test_id)
        elif p in BAD and f not in BAD:
            fixed.append(test_id)
    is_expected = lambda t: any(fnmatch.fnmatchcase(t, g) for g in expected)  # noqa: E731
    unexpected = [t for t in fused_only + missing if not is_expected(t)]
    return {
        "counts": {name: dict(collections.Counter(run.values())) for name, run in
                   (("plain", plain), ("fused", fused))},
        "fused_only_failures": fused_only,
        "missing_from_fused": missing,
        "expected_differences": [t for t in fused_only + missing if is_expected(t)],
        "unexpected": unexpected,
        "pass_only_with_fused": fixed,
    }


def markdown(summary: dict) -> str:
    kinds = ("passed", "failed", "error", "skipped")
    lines = ["# peft test suite: plain peft vs llmopt_ext fused LoRA layer", "",
             "| pass | " + " | ".join(kinds) + " | total |", "|---" * (len(kinds) + 2) + "|"]
    for name, c in summary["counts"].items():
        lines.append(f"| {name} | " + " | ".join(str(c.get(k, 0)) for k in kinds) + f" | {sum(c.values())} |")
    lines += ["", f"Fails only with the fused layer: {len(summary['fused_only_failures'])} "
              f"(expected, listed with a reason: {len(summary['expected_differences'])}; "
              f"unexpected: {len(summary['unexpected'])})"]
    lines += [f"- UNEXPECTED {t}" for t in summary["unexpected"]]
    lines += [f"- expected {t}" for t in summary["expected_differences"]]
    cov = summary.get("coverage")
    if cov:
        lines += ["", "## fused-path coverage (fused pass)", "",
                  f"Tests that built a fused layer: {cov['tests']['built_fused_layer']}; ran the fused op: "
                  f"{cov['tests']['ran_fused_op']}; only fell back to peft's forward: "
                  f"{cov['tests']['only_fell_back']}; built but never called: {cov['tests']['built_but_no_forward']}",
                  "", "| forward calls | count |", "|---|---|"]
        lines += [f"| fused: {k} | {v} |" for k, v in sorted(cov["fused_calls"].items(), key=lambda kv: -kv[1])]
        lines += [f"| fallback: {k} | {v} |" for k, v in sorted(cov["fallback_calls"].items(), key=lambda kv: -kv[1])]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    plain_xml, fused_xml, coverage_json, out_prefix, expected_txt = argv
    summary = compare(outcomes(plain_xml), outcomes(fused_xml), read_expected(expected_txt))
    try:
        with open(coverage_json) as f:
            summary["coverage"] = json.load(f)
    except FileNotFoundError:
        summary["coverage"] = None
    with open(out_prefix + ".json", "w") as f:
        json.dump(summary, f, indent=1)
    text = markdown(summary)
    with open(out_prefix + ".md", "w") as f:
        f.write(text)
    print(text)
    return 1 if summary["unexpected"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
