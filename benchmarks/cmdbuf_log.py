"""What XLA re-records of a step's CUDA graph before each launch, read from XLA's own log.

  TF_CPP_MIN_LOG_LEVEL=0 TF_CPP_VMODULE=command_buffer_thunk=3,command_executor=5,command_buffer_cmd=5 \\
    python benchmarks/profile_step.py --model named:llama3-8b --batch-size 256 --steps 5 2> xla.log
  python benchmarks/cmdbuf_log.py xla.log --out cmdbuf.json

XLA updates a finalized command buffer when a buffer allocation its commands use has moved
since the last launch, and then re-records only the commands that use a moved allocation
("Updated N commands in X us (skipped S command updates)"). The timeline shows the update's
length (`command_buffer::update`); this log says how many commands it re-recorded and which
kinds. Every log line is reduced to a template (file, line, the message with numbers and
addresses replaced by #) and counted in the window before the largest command buffer's last
update summary (the model step's, not the sampler's), so the report
does not depend on the exact wording of XLA's messages beyond that summary line.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys

GLOG = re.compile(r"^[IWEF]\d{4} [\d:.]+\s+\d+ ([\w.]+:\d+)\] (.*)$")
UPDATED = re.compile(r"Updated (\d+) commands in (\d+) \S+ \(skipped (\d+) command updates\)")
ALLOCS = re.compile(r"updated_allocs=(\d+)")
NUMBERS = re.compile(r"0x[0-9a-fA-F]+|\d+")


def template(where: str, message: str) -> str:
    return f"{where.split(':')[0]}: {NUMBERS.sub('#', message)[:160]}"


def summarize(lines, top: int = 25) -> dict:
    updates, allocs = [], []
    window: collections.Counter = collections.Counter()
    windows = []
    for line in lines:
        m = GLOG.match(line.rstrip("\n"))
        if not m:
            continue
        where, message = m.groups()
        u = UPDATED.search(message)
        if u:
            n, us, skipped = map(int, u.groups())
            updates.append({"commands": n, "us": us, "skipped": skipped, "recorded": n - skipped})
            windows.append((n, window))
            window = collections.Counter()
            continue
        a = ALLOCS.search(message)
        if a:
            allocs.append(int(a.group(1)))
        window[template(where, message)] += 1
    by_size = collections.defaultdict(list)  # a command buffer's size names it (the step's, the sampler's)
    for u in updates:
        by_size[u["commands"]].append(u)
    programs = {}
    for n, us in sorted(by_size.items(), reverse=True):
        steady = us[len(us) // 2:]  # the later half: past start-up's first recordings
        programs[str(n)] = {"updates": len(us), "recorded": [u["recorded"] for u in steady][-8:],
                            "us": [u["us"] for u in steady][-8:]}
    # the log lines before the largest command buffer's last update: what its re-recording logged
    largest = max(by_size, default=None)
    last = next((w for n, w in reversed(windows) if n == largest), window)
    return {"updates": len(updates), "by_command_buffer_size": programs, "updated_allocs": allocs[-8:],
            "largest_last_update_templates": last.most_common(top)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("log")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    with open(args.log, errors="replace") as f:
        report = summarize(f, args.top)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0 if report["updates"] else 1


if __name__ == "__main__":
    sys.exit(main())
