"""Prints "N passed, N failed, N skipped" for the last `bazel test //...` run.

Counts the test cases in each test target's JUnit XML under bazel-testlogs/
(written by pytest through $XML_OUTPUT_FILE). A target with no XML (its build
failed, or it was never run) counts as one failure. Exits 1 when anything failed.
"""

import pathlib
import subprocess
import sys
import xml.etree.ElementTree as ET


def main() -> int:
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
        root = ET.parse(xml_file).getroot()
        suites = [root] if root.tag == "testsuite" else root.iter("testsuite")
        for suite in suites:
            n = int(suite.get("tests", 0))
            bad = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
            skip = int(suite.get("skipped", 0))
            passed += n - bad - skip
            failed += bad
            skipped += skip
    print(f"{passed} passed, {failed} failed, {skipped} skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
