"""Entry point of the pagedjax_pytest targets: runs pytest on the files in argv."""

import os
import sys

import pytest

if __name__ == "__main__":
    args = ["-q", "-p", "no:cacheprovider", "-o", "addopts=", "--rootdir", os.getcwd()]
    if os.environ.get("XML_OUTPUT_FILE"):  # set by `bazel test`
        args.append("--junitxml=" + os.environ["XML_OUTPUT_FILE"])
    sys.exit(pytest.main(args + sys.argv[1:]))
