"""Prints "N passed, N failed, N skipped" for the last `bazel test //...` run.

Counts the test cases in each test target's JUnit XML under bazel-testlogs/ (written by
pytest through $XML_OUTPUT_FILE). A target with no XML, or with an XML older than `--since`
(its build failed, or a stale result from an earlier run), counts as one failure: the line
speaks of this run's results only. With `--bep` (Bazel's --build_event_json_file of the run),
a target Bazel calls failed whose XML shows no failing case (the process crashed or exited
non-zero after its tests) counts as one failure too. Exits 1 when anything failed.

Usage: python tools/test_summary.py [--since EPOCH_SECONDS] [--bep FILE]
"""

import argparse
import json
import pathlib
import subprocess
import sys
import xml.etree.ElementTree as ET


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--since", type=float, default=None,
                        help="ignore (and fail) results written before this time (seconds since the epoch)")
    parser.add_argument("--bep", default=None, help="Bazel's --build_event_json_file of the run")
    args = parser.parse_args()
    bazel_failed = set()  # labels whose test result Bazel reports as anything but PASSED
    if args.bep:
        for line in pathlib.Path(args.bep).read_text().splitlines():
            event = json.loads(line)
            if "testResult" in event.get("id", {}) and event.get("testResult", {}).get("status") != "PASSED":
                bazel_failed.add(event["id"]["testResult"]["label"])
    labels = subprocess.run(
        ["bazel", "query", "--noshow_progress", 'tests(//...) except attr("tags", "manual", tests(//...))'],
        check=True, capture_output=True, text=True,
    ).stdout.split()
    logs = pathlib.Path("bazel-testlogs")
    passed = failed = skipped = 0
    for label in labels:
        package, name = label.lstrip("/").split(":")
        xml_file = logs / package / name / "test.xml"
        if not xml_file.exists():
            print(f"{label}: no results", file=sys.stderr)
            failed += 1
            continue
        if args.since is not None and xml_file.stat().st_mtime < args.since - 1:
            print(f"{label}: no results from this run (the XML is older than the run)", file=sys.stderr)
            failed += 1
            continue
        root = ET.parse(xml_file).getroot()
        suites = [root] if root.tag == "testsuite" else root.iter("testsuite")
        target_bad = 0
        for suite in suites:
            n = int(suite.get("tests", 0))
            bad = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
            skip = int(suite.get("skipped", 0))
            passed += n - bad - skip
            failed += bad
            skipped += skip
            target_bad += bad
        if label in bazel_failed and not target_bad:
            print(f"{label}: failed after its test cases passed (a crash or a non-zero exit: see its test.log)",
                  file=sys.stderr)
            failed += 1
    print(f"{passed} passed, {failed} failed, {skipped} skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
