"""Summarize a pytest JUnit XML file into results/reliability.json (cases tried, passed).

Usage: python tests/reliability_report.py results/reliability.xml results/reliability.json
"""

import json
import os
import sys
import tempfile
import xml.etree.ElementTree as ET


def main(xml_path: str, out_path: str) -> int:
    cases = []
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        outcome = "passed"
        for child, name in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")):
            node = case.find(child)
            if node is not None:
                outcome = name
                message = (node.get("message") or "").splitlines()[:1]
                break
        else:
            message = []
        cases.append({"case": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time", 0)), **({"message": message[0]} if message else {})})
    summary = {"tried": len(cases), "passed": sum(c["outcome"] == "passed" for c in cases),
               "failed": sum(c["outcome"] in ("failed", "error") for c in cases),
               "skipped": sum(c["outcome"] == "skipped" for c in cases), "cases": cases}
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(out_path) or ".", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(tmp, out_path)
    print(f"reliability: {summary['passed']}/{summary['tried']} passed, {summary['skipped']} skipped -> {out_path}")
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
