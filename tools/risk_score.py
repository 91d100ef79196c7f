#!/usr/bin/env python3
"""Scores an SME loan: {"amount", "sector"} on stdin -> {"risk", "risk_level"} on stdout."""
import json, sys

req = json.load(sys.stdin)
amount = req.get("amount")
if not isinstance(amount, (int, float)) or amount <= 0:
    print(f"amount must be a positive number, got {amount!r}", file=sys.stderr)
    sys.exit(2)
sector_risk = {"construction": 0.3, "hospitality": 0.25, "software": 0.1}.get(req.get("sector"), 0.2)
risk = round(min(1.0, sector_risk + amount / 1_000_000), 4)
json.dump({"risk": risk, "risk_level": "high" if risk >= 0.4 else "low"}, sys.stdout)
